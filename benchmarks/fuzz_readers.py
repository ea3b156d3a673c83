"""Fuzz ostate's readers for longer than CI does: mutated real checkpoints of every layout.

The same search as tests/test_fuzz_readers.py (one mutated file per input: truncation,
bit flips, a zeroed range, an overwritten field, a spliced slice, or a file name from the
checkpoint's metadata rewritten to leave its folder; tests/helpers/specimens.py; and, as the
layout ``torch-pickle``, the same mutations of a real torch.save file's pickle read by ostate's
own reader, where ``error`` is its one-line refusal),
with more inputs, each read and analysed in this process under an address-space limit
and a per-input alarm. Every outcome is counted: ``ok`` (a result), ``error`` (a
one-line OstateError), and the bugs: ``exception`` (anything else), ``hang`` (past
the alarm), ``memory`` (MemoryError under the limit), ``escaped`` (a result from a
checkpoint whose metadata names a file outside its folder). The first few bugs are shown
with the input that caused them, which is kept under ``--dir``.

With ``--atheris`` (``pip install atheris``), atheris picks the mutations, guided by
coverage of ostate's code, instead of a seeded random generator.

Usage:
    python benchmarks/fuzz_readers.py [--inputs 2000] [--seed 0] [--dir /tmp/ostate-fuzz] [--atheris]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if "--atheris" in sys.argv:  # coverage instrumentation has to wrap the first import of ostate
    import atheris

    with atheris.instrument_imports(include=["ostate"]):
        import ostate  # noqa: F401
from tests.helpers import specimens  # noqa: E402  (the checkpoints and mutations the fuzz test uses)

_ALARM_S = 60
_ADDRESS_SPACE = 6 << 30


class _Hang(Exception):
    pass


def _alarm(*_args) -> None:
    raise _Hang()


def try_one(spec: specimens.Specimen, work: Path, file_index: int, kind: str, a: int, b: int, c: int) -> str:
    """The outcome of one mutated input: ``ok``, ``error``, ``exception``, ``hang``, ``memory`` or ``escaped``."""
    target = Path(tempfile.mkdtemp(prefix="input-", dir=work))
    copy = specimens.mutated_copy(spec, target, file_index, kind, a, b, c)
    signal.alarm(_ALARM_S)
    try:
        outcome = specimens.inspect_outcome(copy)
    except _Hang:
        outcome = "hang"
    except MemoryError:
        outcome = "memory"
    except Exception:
        outcome = "exception"
        print(f"\n{spec.format} {kind} file {file_index} ({a}, {b}, {c}) kept in {target}:", file=sys.stderr)
        traceback.print_exc(limit=-4)
    finally:
        signal.alarm(0)
    if outcome == "ok" and kind == "escape" and spec.format in specimens.ESCAPING:
        outcome = "escaped"
        print(f"\n{spec.format} escape ({a}, {b}) was followed outside the folder, kept in {target}", file=sys.stderr)
    if outcome in ("ok", "error"):
        shutil.rmtree(target)
    return outcome


PICKLE = "torch-pickle"


def try_pickle(archive, data: bytes, kind: str, a: int, b: int, c: int) -> str:
    """The outcome of one mutated pickle read by ostate's own reader (``error``: refused in one line)."""
    mutated = specimens.mutate(data, kind, a, b, c)
    signal.alarm(_ALARM_S)
    try:
        return "ok" if specimens.pickle_outcome(mutated, archive) == "ok" else "error"
    except _Hang:
        return "hang"
    except MemoryError:
        return "memory"
    except Exception:
        print(f"\n{PICKLE} {kind} ({a}, {b}, {c}):", file=sys.stderr)
        traceback.print_exc(limit=-4)
        return "exception"
    finally:
        signal.alarm(0)


def run_random(built: dict[str, specimens.Specimen], work: Path, inputs: int, seed: int) -> collections.Counter:
    from ostate.formats.files.torch_pickle import TorchArchive

    archive = TorchArchive(str(built["torch-zip"].path))
    index = archive.pickle()
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    names = [*built, PICKLE]
    for i in range(inputs):
        name = names[i % len(names)]
        kind = rng.choice(specimens.MUTATIONS)
        args = [rng.randrange(1 << 20) for _ in range(3)]
        if name == PICKLE:
            counts[(name, try_pickle(archive, index, kind, *args))] += 1
            continue
        counts[(name, try_one(built[name], work, rng.randrange(64), kind, *args))] += 1
        if (i + 1) % 100 == 0:
            print(f"{i + 1} inputs", file=sys.stderr, flush=True)
    return counts


def run_atheris(built: dict[str, specimens.Specimen], work: Path, inputs: int, start: float) -> None:
    """Let atheris (libFuzzer) choose the inputs; report after ``inputs`` of them and end the process
    (libFuzzer ends it from C when its own run count is reached, before Python could report)."""
    counts: collections.Counter = collections.Counter()
    names = list(built)

    def one_input(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        name = names[provider.ConsumeIntInRange(0, len(names) - 1)]
        kind = specimens.MUTATIONS[provider.ConsumeIntInRange(0, len(specimens.MUTATIONS) - 1)]
        args = [provider.ConsumeIntInRange(0, 1 << 20) for _ in range(4)]
        counts[(name, try_one(built[name], work, args[0], kind, *args[1:]))] += 1
        done = sum(counts.values())
        if done % 100 == 0:
            print(f"{done} inputs", file=sys.stderr, flush=True)
        if done >= inputs:
            report(counts, time.perf_counter() - start, "atheris, coverage-guided")
            sys.stdout.flush()
            os._exit(0)

    atheris.Setup([sys.argv[0], "-seed=1", "-rss_limit_mb=0", "-timeout=0"], one_input)
    atheris.Fuzz()


def report(counts: collections.Counter, seconds: float, driver: str) -> None:
    outcomes = ("ok", "error", "exception", "hang", "memory", "escaped")
    total = sum(counts.values())
    print(f"{total} inputs in {seconds:.0f} s ({driver}); alarm {_ALARM_S} s, address space {_ADDRESS_SPACE >> 30} GiB")
    print()
    print("| layout | " + " | ".join(outcomes) + " |")
    print("|---" * (len(outcomes) + 1) + "|")
    for name in dict.fromkeys(n for n, _ in counts):
        print(f"| {name} | " + " | ".join(str(counts[(name, o)]) for o in outcomes) + " |")
    print("| all | " + " | ".join(str(sum(v for (n, o), v in counts.items() if o == k)) for k in outcomes) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/ostate-fuzz")
    parser.add_argument("--atheris", action="store_true", help="let atheris choose the mutations (coverage-guided)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _alarm)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    built = {name: specimens.build(name, work / "specimens" / name) for name in specimens.BUILDERS}
    start = time.perf_counter()
    if args.atheris:
        run_atheris(built, work, args.inputs, start)  # reports and ends the process
    else:
        counts = run_random(built, work, args.inputs, args.seed)
    report(counts, time.perf_counter() - start, "atheris" if args.atheris else f"random, seed {args.seed}")


if __name__ == "__main__":
    main()
