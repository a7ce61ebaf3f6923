"""Where the weights come from: the official asset registry (assets), downloading and unpacking it
(download) and the checkpoint folder's location (paths). See docs/checkpoints.md."""
