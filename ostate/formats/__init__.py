"""Checkpoint readers and writers, one module or subpackage per layout.

- :mod:`~ostate.formats.registry` lists every layout ostate reads (:data:`READERS`) and
  matches a path to one; :mod:`~ostate.formats.reader` is what each provides.
- One backend per module or subpackage, its reader and writer side by side:
  :mod:`~ostate.formats.torch_save`, :mod:`~ostate.formats.hf_trainer`,
  :mod:`~ostate.formats.accelerate`, :mod:`~ostate.formats.dcp`,
  :mod:`~ostate.formats.deepspeed`, :mod:`~ostate.formats.safetensors_optim`.
- :mod:`~ostate.formats.files`: low-level file access (a ``torch.save`` file opened
  safely, safetensors headers and tensors, memory-mapped pages given back, file names from a
  checkpoint's metadata checked to stay inside its folder).
- :mod:`~ostate.formats.naming`: from loaded objects to named parameters (finding the
  state dicts in a checkpoint, reading one optimizer, naming by the model's order,
  weights beside the optimizer, a Hugging Face model's order from its config).

Readers know nothing of statistics; the optimizer family is decided above them, in
:func:`ostate.load` (:mod:`ostate.loading`).
"""
