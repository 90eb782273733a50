"""Checkpoint files at the edges: written whole or not at all
(:func:`mmsn.utils.io.save_atomically`), read only when intact
(:func:`mmsn.utils.io.check_zip_records`), and unpickled under
``weights_only=True`` with nothing but what mmengine writes allowed
(:mod:`mmsn.utils.checkpoint`)."""
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from mmsn.utils.checkpoint import mmengine_checkpoint_globals
from mmsn.utils.io import (DamagedFileError, check_zip_records,
                           save_atomically)

REPO = Path(__file__).resolve().parents[1]

# Saves a checkpoint whose pickling stops for a minute (after torch.save has
# created its file), so it can be killed mid-write.
KILLED_SAVE = '''
import sys, time, torch
from mmsn.utils.io import save_atomically

class Slow:
    def __reduce__(self):
        print('WRITING', flush=True)
        time.sleep(60)
        return (int, ())

save_atomically({'w': torch.zeros(1000), 'slow': Slow()}, sys.argv[1])
'''


def test_killed_save_leaves_the_old_file_and_the_next_save_cleans_up(
        tmp_path):
    dst = tmp_path / 'model.pth'
    dst.write_bytes(b'previous')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, '-c', KILLED_SAVE, str(dst)],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == 'WRITING\n'
    finally:
        proc.kill()
        proc.wait()
    partial = tmp_path / f'model.pth.{proc.pid}.partial'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'model.pth', partial.name]
    assert dst.read_bytes() == b'previous'

    save_atomically({'w': torch.arange(3)}, str(dst))
    assert [p.name for p in tmp_path.iterdir()] == ['model.pth']
    assert torch.equal(torch.load(dst, weights_only=True)['w'],
                       torch.arange(3))


def test_failed_save_leaves_the_old_file_and_no_partial_one(tmp_path):
    dst = tmp_path / 'model.pth'
    dst.write_bytes(b'previous')
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_atomically({'f': lambda: None}, str(dst))
    assert [p.name for p in tmp_path.iterdir()] == ['model.pth']
    assert dst.read_bytes() == b'previous'


def _flip(path, raw, offset=0, count=64):
    """Change ``count`` bytes of ``raw`` (found in the file) in place."""
    data = bytearray(Path(path).read_bytes())
    start = bytes(data).index(raw) + offset
    data[start:start + count] = bytes(b ^ 0x5A
                                      for b in data[start:start + count])
    Path(path).write_bytes(bytes(data))


def _record_holding(path, raw):
    with zipfile.ZipFile(path) as archive:
        names = [i.filename for i in archive.infolist()
                 if archive.read(i) == raw]
    assert len(names) == 1
    return names[0]


def test_zip_records_are_checked_and_the_damaged_one_named(tmp_path):
    path = tmp_path / 'ckpt.pth'
    weight = torch.linspace(-1, 1, 2000)
    torch.save({'weight': weight, 'name': 'conv1'}, path)
    check_zip_records(str(path))        # intact: nothing to say

    # the pickle itself, not only tensor bytes
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read('ckpt/data.pkl')
    _flip(path, b'conv1', count=5)
    with pytest.raises(DamagedFileError) as err:
        check_zip_records(str(path))
    assert str(err.value) == (
        f"{path} is damaged: its record 'ckpt/data.pkl' does not match what "
        f"was saved (Bad CRC-32 for file 'ckpt/data.pkl'). A download or "
        f"copy that went wrong, or a failing disk, changes bytes; get the "
        f"file again")
    assert pickled != _read_without_check(path, 'ckpt/data.pkl')

    torch.save({'weight': weight}, path)
    record = _record_holding(path, weight.numpy().tobytes())
    _flip(path, weight.numpy().tobytes(), offset=100)
    with pytest.raises(DamagedFileError, match=f'its record {record!r}'):
        check_zip_records(str(path))


def _read_without_check(path, name):
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        with open(path, 'rb') as f:
            f.seek(info.header_offset + 26)
            skip = int.from_bytes(f.read(2), 'little') + int.from_bytes(
                f.read(2), 'little')
            f.seek(skip, 1)
            return f.read(info.compress_size)


def test_files_without_checksums_are_left_to_the_loader(tmp_path):
    """What carries no CRCs cannot be checked, and is not refused: torch's
    format before 1.6, a file saved with CRCs switched off, not a zip."""
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(3)}, legacy,
               _use_new_zipfile_serialization=False)
    check_zip_records(str(legacy))
    other = tmp_path / 'notes.txt'
    other.write_text('not a checkpoint')
    check_zip_records(str(other))
    if not hasattr(torch.serialization, 'set_crc32_options'):
        return
    no_crc = tmp_path / 'no_crc.pth'
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({'w': torch.ones(300)}, no_crc)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(no_crc) as archive:
        assert {i.CRC for i in archive.infolist() if i.file_size} == {0}
    check_zip_records(str(no_crc))


# -- the weights-only getattr stand-in ---------------------------------------
class _GetAttr:
    """Pickles as ``getattr(owner, name)``, as mmengine's message hub
    pickles HistoryBuffer's statistics methods."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def _load_pickled(obj):
    buffer = io.BytesIO()
    torch.save({'value': obj}, buffer)
    buffer.seek(0)
    with mmengine_checkpoint_globals():
        return torch.load(buffer, weights_only=True)['value']


def test_getattr_resolves_history_buffer_statistics():
    HistoryBuffer()     # registers the default statistics
    for name in ('min', 'max', 'current', 'mean'):
        assert _load_pickled(_GetAttr(HistoryBuffer, name)) is getattr(
            HistoryBuffer, name)


def _history_buffer():
    buffer = HistoryBuffer()
    buffer.update(0.5)      # (an empty one pickles bytes(), not allowed)
    return buffer


@pytest.mark.parametrize(
    'owner,name',
    [
        (np.ndarray, 'mean'),           # another allowed class
        (_history_buffer(), 'mean'),    # an instance, not the class
        (HistoryBuffer, '__init__'),    # not a statistics method
        (HistoryBuffer, 'update'),
    ],
    ids=['other-class', 'instance', 'dunder', 'other-method'])
def test_getattr_refuses_everything_else(owner, name):
    with pytest.raises(pickle.UnpicklingError,
                       match=f'refusing getattr.*{name!r}.*only '
                       f'HistoryBuffer statistics methods are allowed'):
        _load_pickled(_GetAttr(owner, name))
