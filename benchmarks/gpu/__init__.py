"""Tools that plan and check eicl's training step on an NVIDIA GPU: what XLA
compiles the step to (gpu_program), modelled H100 step times from that
(time_model), the ResNet stem's forms checked and timed (stem_check), and
the shell scripts a lent GPU runs (gpu_session.sh, gpu_bench.sh). Run them
from the repository root; README.md here says how and which
docs/results/gpu/ files each reads and writes.
"""
