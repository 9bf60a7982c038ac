"""Benchmarks and deployment: side-by-side speed (:func:`run_bench`), BatchNorm folding into a
plain conv chain (:func:`deploy`) and ONNX export with an onnxruntime parity check."""

from .bench import BenchConfig, count_flops, format_table, matmul_peak, run_bench
from .fuse import deploy, fold_conv_bn

__all__ = ["BenchConfig", "run_bench", "format_table", "matmul_peak", "count_flops", "deploy", "fold_conv_bn"]
