"""Checkpoint files: written whole or not at all, read only when intact.

* :func:`save_atomically` (and :func:`atomic_output` for other writers)
  write to ``<dst>.<pid>.partial`` next to ``dst`` and move it into place
  when complete, so a failure leaves no partial ``dst`` and an existing one
  untouched. A process killed while writing cannot clean up; the next write
  to the same ``dst`` removes the partial files of processes that no longer
  run.
* :func:`check_zip_records` reads every record of a ``torch.save`` archive,
  which checks its CRC-32 (``torch.load`` does not), and names the first
  damaged one; :func:`load_error_reason` states why ``torch.load``
  refused a file without torch's advice to load it unsafely.
"""
import contextlib
import os
import os.path as osp
import zipfile
import zlib
from typing import Iterator

import torch

PARTIAL_SUFFIX = '.partial'
ZIP_MAGIC = b'PK\x03\x04'    # a zip archive's first local header


class DamagedFileError(ValueError):
    """A file's bytes are not the ones that were written."""


def _partial_path(dst: str) -> str:
    """Where this process writes ``dst`` before it is whole."""
    return f'{dst}.{os.getpid()}{PARTIAL_SUFFIX}'


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's live process
        return True
    return True


def remove_stale_partials(dst: str) -> None:
    """Remove ``<dst>.<pid>.partial`` files left by processes that were
    killed while writing ``dst`` (those of running processes stay)."""
    folder = osp.dirname(osp.abspath(dst))
    prefix = osp.basename(dst) + '.'
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):-len(PARTIAL_SUFFIX)]
        if (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)
                and pid.isdigit() and not _running(int(pid))):
            with contextlib.suppress(OSError):
                os.remove(osp.join(folder, name))


@contextlib.contextmanager
def atomic_output(dst: str) -> Iterator[str]:
    """A path to write ``dst`` to: moved to ``dst`` when the block ends
    normally, removed when it raises.

    Example::

        with atomic_output('model.py') as tmp:
            with open(tmp, 'w') as f:
                f.write(text)
    """
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    remove_stale_partials(dst)
    tmp = _partial_path(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        if osp.lexists(tmp):
            os.remove(tmp)


def save_atomically(obj, dst: str) -> None:
    """``torch.save(obj, dst)`` through :func:`atomic_output`: a failed or
    killed save leaves no partial ``dst`` (and an existing one untouched).
    """
    with atomic_output(dst) as tmp:
        torch.save(obj, tmp)


def check_zip_records(path: str) -> None:
    """Read every record of the zip archive at ``path`` (the format of
    ``torch.save`` since PyTorch 1.6) to check its CRC-32, which
    ``torch.load`` does not.

    A file that does not begin as a zip archive (e.g. torch's older format,
    which has no checksums) is left to the loader, and so is a record stored
    with a CRC of 0 (``torch.serialization.set_crc32_options(False)``
    writes no checksums).

    Raises:
        DamagedFileError: naming the first record whose bytes do not match
            their CRC-32 or cannot be read, or saying that the archive has
            no readable directory (a file cut short).
    """
    with open(path, 'rb') as f:
        if f.read(4) != ZIP_MAGIC:
            return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DamagedFileError(
            f'{path} is damaged: it begins as a zip archive (the format of '
            f'torch.save) but has no readable zip directory at its end, as '
            f'when a download or copy is cut short; get the file again'
        ) from None
    record = None
    try:
        with archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue    # saved without checksums: nothing to check
                record = info.filename
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, EOFError, zlib.error,
            NotImplementedError) as err:
        raise DamagedFileError(
            f'{path} is damaged: its record {record!r} does not match what '
            f'was saved ({err}). A download or copy that went wrong, or a '
            f'failing disk, changes bytes; get the file again') from None


def load_error_reason(err: Exception) -> str:
    """The first sentence of why ``torch.load(weights_only=True)`` failed.

    torch's message goes on to advise loading with ``weights_only=False``
    or allowlisting the refused global; for a file of unknown origin that
    would run whatever it holds, so the advice is left out."""
    text = str(err)
    marker = 'WeightsUnpickler error:'
    if marker in text:
        text = text.split(marker, 1)[1]
    paragraph = next((p for p in text.split('\n\n') if p.strip()), '')
    sentence = ' '.join(paragraph.split()).split('. ', 1)[0].rstrip('.')
    return sentence or type(err).__name__
