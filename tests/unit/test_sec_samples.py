"""Sample data as the server reads it, without a server: what it reads is what
numpy wrote. Hostile sample data pushed to a real `edgefleet server`:
tests/e2e/test_sec_samples.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.controlplane.domain import sample_archive


def test_what_the_server_reads_is_what_numpy_wrote(tmp_path: Path) -> None:
    """The bounded reader returns the arrays np.load would: stored and
    deflated members, Fortran order, big-endian, 0-d and empty arrays."""
    rng = np.random.default_rng(1)
    arrays = {
        "fortran": np.asfortranarray(rng.random((5, 3, 2))),
        "big_endian": rng.integers(0, 9, 7).astype(">i4"),
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float16),
        "scalar": np.array(3.5, np.float32),
        "complex": (rng.random((3, 3)) + 1j).astype(np.complex64),
    }
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    for name in ("stored.npz", "deflated.npz"):
        got = sample_archive.load(tmp_path / name)
        assert got.keys() == arrays.keys()
        for key, want in arrays.items():
            assert got[key].dtype == want.dtype.newbyteorder("="), key
            assert got[key].dtype.isnative and got[key].shape == want.shape, key
            assert np.array_equal(got[key], want), key
    np.save(tmp_path / "one.npy", arrays["fortran"])
    (only,) = sample_archive.load(tmp_path / "one.npy").values()
    assert np.array_equal(only, arrays["fortran"])
