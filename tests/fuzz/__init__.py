"""A differential fuzzer for einfuse: random small PyTorch programs, compiled and checked against eager.

* `program`: a program as plain data (inputs, submodules, statements, outputs) that prints as Python you
  can paste, and builds the module and its inputs;
* `ops`: the op library (one function per op family, each drawing its operands and parameters) and the
  hypothesis strategy `programs()` that strings them together;
* `check`: the oracle (compile through each backend, call on fresh inputs, compare with eager or expect
  eager's exception);
* `worker`: runs checks in a child process, so a segfault is a reported failure and not a dead pytest;
  also the command line for long runs (`python -m fuzz.worker --help`, with tests/ on sys.path).

Nothing here imports einfuse at module level except `check` (lazily, inside the worker), so the generator
runs unchanged against any einfuse tree (PYTHONPATH=/path/to/other/tree).
"""
