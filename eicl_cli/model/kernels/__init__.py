"""Hand-written kernels for the encoders, kept apart from the architecture.

The architecture (model.py, encoders.py, layers.py, transformer.py, rnn.py,
tokens.py) says what the model computes; the modules here compute parts of
it, the convolutions and above all the ResNet stem (its 7 x 7 convolution,
3 x 3 stride-2 max pool and batch norm's moments of the convolution's map),
faster than XLA's own ops do, with the same values and gradients. The stem's
kernels exist because the stem is bound by
memory, not arithmetic: its 64-channel map is the largest array of a step,
and XLA writes it and reads it back for the moments, the pool and their
gradients. encoders._stem picks one of these forms (or XLA's, "whole") when
the step is compiled:

- pooling: the signed max pool and its gradient from an int8 choice per
  window, because lax.reduce_window's gradient (select-and-scatter) is much
  slower on a CPU. Two forms with the same results: separable (rows, then
  columns: the whole-map stem on a CPU) and one-pass (all nine window
  elements: a GPU's, and the blocked stem's). Its tie rule (rule3) is the one
  the other two modules follow.
- stem_blocked: the stem on a CPU, a few images at a time, so the map stays
  in cache; the moments' gradients come from the kernel taps' Gram matrix, so
  no map is needed for them. A custom vmap rule serves `sweep --stack`.
- convolution: the convolutions encoders.Conv2D runs: XLA's, as im2col
  GEMMs (a batched GEMM under `sweep --stack` instead of a grouped
  convolution), and for the images themselves a weight gradient written as
  one GEMM with no gradient back to the data.
- stem_fused: the stem on a CUDA GPU as two Pallas (Triton) kernels, forward
  and backward, that never write the map to memory. Off a GPU Pallas
  interprets them (how the tests check them). Its kernel_flops and PRODUCTS
  are what benchmarks/gpu/gpu_program.py counts the kernels' FLOPs by.

Import the modules themselves (`from eicl_cli.model.kernels import
stem_fused`); this package imports none of them, so that importing one does
not load the others (stem_fused loads Pallas).
"""
