"""Entry-point glue: bad input becomes one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import ast
import difflib
import os
import pathlib
import re
import signal
import sys
import threading
import traceback

# Errors a user can cause (files, options, workdirs); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


class Terminated(KeyboardInterrupt):
  """SIGTERM (`kill`, a scheduler's time limit), raised as Ctrl-C is, so that the same cleanups
  run: a study records the interrupted attempt's time, files being written are discarded."""


def _raise_terminated(signum, frame):
  raise Terminated()


def run(main_fn, reuse_freed_memory: bool = True) -> None:
  """Runs an entry point's `main_fn`; `reuse_freed_memory`: hemijax.runtime's allocator setting
  unless HEMIJAX_MALLOC says otherwise (training: yes; whole-volume inference: no, its heap
  fragments). SIGTERM ends it as Ctrl-C does (exit 143 instead of 130); a background process
  started by a script ignores Ctrl-C's SIGINT, so SIGTERM is how one stops it cleanly."""
  from hemijax import runtime
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    # Before JAX starts: freed memory reused, not faulted in again each step (hemijax.runtime).
    runtime.reuse_freed_memory(default=reuse_freed_memory)
    main_fn()
  except USER_ERRORS + (RuntimeError,) as e:
    if os.environ.get("HEMIJAX_DEBUG") or not _is_user_error(e):
      _exit_if_distributed(e)
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    _exit_if_distributed()
    sys.exit(1)
  except KeyboardInterrupt as e:
    terminated = isinstance(e, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    sys.exit(143 if terminated else 130)
  except Exception as e:
    _exit_if_distributed(e)
    raise


def _exit_if_distributed(error=None) -> None:
  """Ends a process of a multi-process run now: at a normal exit jax.distributed waits for every
  process at a shutdown barrier, which a crashed peer never reaches (a long wait, then an abort)."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return
  if isinstance(error, jax.errors.JaxRuntimeError):  # a collective with a process that has died
    print(f"error: process {jax.process_index()}: another process of this run failed or is "
          f"unreachable ({_first_line(error)})", file=sys.stderr)
  elif error is not None:
    traceback.print_exception(error)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def _is_user_error(e) -> bool:
  from hemijax.training import TrainingError
  return isinstance(e, USER_ERRORS + (TrainingError,))


def parse_flags(argv):
  """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`), with a bad flag, config
  file, preset or `--config.x.y` override as one line on stderr (and a suggestion) and exit 1,
  instead of absl's and ml_collections' tracebacks."""
  from absl import flags
  try:
    args = flags.FLAGS(argv)
    for name in set(flags.FLAGS):  # ml_collections defers a config file's load error to first use
      flag = flags.FLAGS[name]
      if type(flag.parser).__name__ == "ConfigFileFlagParser" and flag.present:
        flag.value.keys()
    return args
  except flags.Error as e:
    message = _flag_error_line(str(e))
  except OSError as e:  # ml_collections: a config file that cannot be loaded
    missing = re.search(r"No such file or directory: '([^']*)'", str(e))
    message = (f"{missing.group(1)}: no such config file{_file_suggestion(missing.group(1))}"
               if missing else _flag_error_line(str(e)))
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # ml_collections, on an override
    message = _unknown_override(argv, flags.FLAGS) or _first_line(e)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def suggestion(word: str, choices) -> str:
  """"; did you mean X?" for the closest of `choices`, or ""."""
  close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def _first_line(e) -> str:
  text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _flag_error_line(text: str) -> str:
  """absl's message (with ml_collections' traceback of a config file inside) as one line: the flag
  and the innermost error, plus a suggestion for an unknown choice or a missing file."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  head = lines[0].removesuffix("Error whilst parsing config file:").rstrip(" :")
  if len(lines) == 1:
    return head
  detail = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
  choice = re.search(r"unknown \w+ '([^']*)'; choose one of (.+)$", detail)
  missing = re.search(r"No such file or directory: '([^']*)'", detail)
  if choice:
    try:
      detail += suggestion(choice.group(1), ast.literal_eval(choice.group(2)))
    except (ValueError, SyntaxError):
      pass
  elif missing:
    detail += _file_suggestion(missing.group(1))
  return f"{head}: {detail}"


def _file_suggestion(path: str) -> str:
  folder = pathlib.Path(path).parent
  if not folder.is_dir():
    return ""
  return suggestion(path, [str(folder / p.name) for p in folder.glob("*.py")])


def _flag_argument(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(argv, flag_values) -> str | None:
  """The first `--config.a.b=...` naming no field of the loaded config, as one line."""
  for arg in argv[1:]:
    match = re.match(r"--(\w+)\.([\w.]+)(=|$)", arg)
    if not match or match.group(1) not in flag_values:
      continue
    name, path = match.group(1), match.group(2).split(".")
    try:
      node = flag_values[name].parser.parse(_flag_argument(argv, name))
    except Exception:  # the config itself fails: absl reports that
      return None
    for depth, key in enumerate(path):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"; did you mean --{name}.{'.'.join(path[:depth] + close[:1])}?" if close else ""
        return (f"--{name}.{'.'.join(path)}: {'.'.join(path[:depth + 1])!r} is not a field of "
                f"the config{hint}")
      node = node[key]
  return None
