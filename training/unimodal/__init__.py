"""Image-only self-supervised baselines on Tandem's trainer: SimCLR, MoCo v2, BYOL, SimSiam,
Barlow Twins, SwAV and SupCon (``methods``), built from ``parts``, ``losses`` and ``transforms``,
evaluated by ``evaluate`` (kNN, linear probe, collapse monitor)."""
