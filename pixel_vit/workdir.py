"""A run's claim on its workdir: writable, and used by one run at a time.

`claim(workdir)` checks, before anything loads or compiles, that the workdir
is a directory this process can write (creating it), and takes an exclusive
lock on `<workdir>/.lock` that the OS releases when the process dies, so a
lock left by a killed run on this host is taken over (with a message naming
its pid) and a live one stops the second run before it races the first on the
same checkpoint paths. A lock file naming another host is refused unless
`take_over` (config.take_over_lock): on a shared filesystem the OS lock may
not reach across hosts, so that run may still be alive. Locking is
local-filesystem only: a `gs://` workdir (a pod's shared bucket) is not
locked, and in a multi-process run process 0 holds the lock for all.
"""

from __future__ import annotations

import fcntl
import os
import socket

import jax
from absl import logging

LOCK_NAME = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Holds `<workdir>/.lock` until `release()` or process exit."""

  def __init__(self, path: str | None, handle=None):
    self.path, self._handle = path, handle

  def release(self) -> None:
    if self._handle is not None:
      self._handle.seek(0)
      self._handle.truncate()  # empty = released cleanly (not a stale lock)
      fcntl.flock(self._handle, fcntl.LOCK_UN)
      self._handle.close()
      self._handle = None


def check_writable(workdir: str) -> None:
  """Raises ValueError naming `workdir` when it is a file or could not be
  created or written; creates nothing (a run refused later leaves no trace)."""
  if "://" in workdir:
    return  # a bucket: its permissions show at the first write
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
      f"--workdir={workdir} is a file, not a directory; pass a directory "
      "(it is created if missing)."
    )
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(
      f"--workdir={workdir} is not writable: {existing} is a file, so the "
      "directory cannot be created; choose another --workdir."
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(
      f"--workdir={workdir} is not writable ({existing} does not allow this "
      "user to write); choose a directory you can write, or fix its "
      "permissions."
    )


def _holder_host(record: str) -> str | None:
  """The host of a lock record 'pid N on HOST' (None if it names none)."""
  _, on, host = record.partition(" on ")
  return (host.strip() or None) if on else None


def claim(workdir: str, *, take_over: bool = False) -> WorkdirLock:
  """check_writable, then the lock (process 0 of a local workdir only);
  `take_over`: also a lock file that another host's run left."""
  check_writable(workdir)
  if "://" in workdir or jax.process_index() != 0:
    return WorkdirLock(None)
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    handle = open(path, "a+")
  except OSError as e:  # e.g. a read-only filesystem, which os.access does not see
    raise ValueError(
      f"--workdir={workdir} is not writable ({e.strerror or e}); choose a "
      "directory you can write, or fix its permissions."
    ) from e
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    holder = handle.read().strip() or "unknown"
    handle.close()
    raise WorkdirInUseError(
      f"--workdir={workdir} is in use by another run ({holder}); two runs on one workdir "
      "would overwrite each other's checkpoints. Wait for it to finish, stop it, or "
      "choose another --workdir."
    ) from None
  handle.seek(0)
  previous = handle.read().strip()
  host = _holder_host(previous)
  if host is not None and host != socket.gethostname() and not take_over:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
    raise WorkdirInUseError(
      f"--workdir={workdir} is locked by a run on another host ({previous}); this host "
      "cannot see whether it still runs (a shared filesystem may not pass the OS lock "
      "between hosts). If it has stopped, take the lock over with "
      "--config.take_over_lock=True; otherwise choose another --workdir."
    )
  if previous:
    logging.warning(
      "%s was left by a run that is no longer alive (%s); taking it over.", path, previous
    )
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  handle.flush()
  return WorkdirLock(path, handle)
