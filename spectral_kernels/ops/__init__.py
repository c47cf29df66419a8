"""Ops: one file per op (kernels, launchers, autograd glue, public function) plus the references."""
