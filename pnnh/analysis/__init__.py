"""Diagnostics: why plain nets lose their input and residual nets keep it.

- :func:`diagnose` (``diagnose(model, images, labels, **settings)``) and :func:`run_diagnostics`
  (with a :class:`DiagnoseConfig`) measure any ``nn.Module`` on one batch of images (dissipating
  inputs with noise floors, surviving neurons, signal propagation, shattered gradients, lesions);
  :func:`plot_diagnostics` / :func:`plot_comparison` draw the results; ``pnnh diagnose`` is the CLI.
- :mod:`~pnnh.analysis.theory`: exact pre-activation moments of He-normal plain and residual
  layers, the Cantelli bound on surviving neurons, and a simulation to check them.
- :mod:`~pnnh.analysis.linear_shortcuts`: deep linear nets with n-layer shortcuts, the exact loss
  Hessian at the zero initial point (Li et al., "Demystifying ResNet").
- :mod:`~pnnh.analysis.ensemble`: the dynamic ensemble (Littwin & Wolf): path-length distributions
  with residual branches weighted by their BN scale or measured size, over a run's snapshots.
- :mod:`~pnnh.analysis.similarity`, :mod:`~pnnh.analysis.gradients`, :mod:`~pnnh.analysis.lesion`,
  :mod:`~pnnh.analysis.probes`, :mod:`~pnnh.analysis.dists`: the pieces, usable on their own.
"""

from .diagnose import DiagnoseConfig, channel_stats, diagnose, load_images, run_diagnostics, summarize
from .ensemble import dynamic_ensemble, effective_path_lengths, weighted_path_lengths
from .gradients import gradient_correlation
from .lesion import lesion_study, path_length_distribution
from .plots import plot_comparison, plot_diagnostics
from .probes import ProbeTap, adopt_blocks, calibrate_batch_norm, get_blocks, resolve_norm_stats, resolve_probe_mode
from .similarity import cka, ridge_r2_with_floor
from .theory import cantelli_bound, predict_moments, simulate_he_layers

__all__ = [
    "diagnose", "DiagnoseConfig", "run_diagnostics", "plot_diagnostics", "plot_comparison", "summarize", "load_images", "channel_stats",
    "gradient_correlation", "lesion_study", "path_length_distribution",
    "weighted_path_lengths", "effective_path_lengths", "dynamic_ensemble",
    "ProbeTap", "adopt_blocks", "calibrate_batch_norm", "get_blocks", "resolve_norm_stats", "resolve_probe_mode",
    "cka", "ridge_r2_with_floor", "cantelli_bound", "predict_moments", "simulate_he_layers",
]
