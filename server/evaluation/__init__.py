"""Table 2 of the StyleHEAT paper as a command: metrics, the same-/cross-identity protocol, the report.

* :mod:`server.evaluation.metrics` -- PSNR, SSIM, Frechet distance, cosine similarity, AED/APD;
* :mod:`server.evaluation.networks` -- LPIPS (AlexNet), FID Inception, ArcFace IR-SE50 in pure torch,
  loaded from files the user names (:class:`WeightsFileError` says which file and where to get it);
* :mod:`server.evaluation.protocol` -- the runner (per-video cache in the output folder);
* :mod:`server.evaluation.report` -- metrics.json, report.md and the figure.

Other server modules are imported inside functions (they are being moved into sub-packages).
"""
