"""A save killed mid-write leaves a temporary beside the tuner file; the next save into that folder removes it, and
only it: this library's own temporaries whose writer is gone (or, writer unknown, that are old), never another
process's save in progress, never anyone else's files (issue 12, part 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import resattn_diffusion as rd
from resattn_diffusion.integration import io
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner

REPO_ROOT = Path(__file__).resolve().parents[1]


def _unet_with_tuner():
    unet = frozen_tiny_unet()
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"))
    randomize_tuner(unet)
    return unet


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_save_killed_mid_write_is_cleaned_up_by_the_next_save(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import safetensors.torch
        import resattn_diffusion as rd
        from resattn_diffusion.testing import frozen_tiny_unet

        def dying_save(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half a tuner")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the write

        safetensors.torch.save_file = dying_save
        unet = frozen_tiny_unet()
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"))
        rd.save_res_tuner(unet, {str(tmp_path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    left = list(tmp_path.glob(".res_tuner.safetensors.*.tmp"))
    assert len(left) == 1 and not (tmp_path / "res_tuner.safetensors").exists()
    _age(left[0], 2 * io.DEAD_WRITER_GRACE_SECONDS)

    saved = rd.save_res_tuner(_unet_with_tuner(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res_tuner.safetensors"]
    rd.load_res_tuner(frozen_tiny_unet(), saved)


def test_only_our_stale_temporaries_go(tmp_path):
    host = io._host()
    dead, alive = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        files = {
            # ours, writer gone: removed
            "dead": f".res_tuner.safetensors.rt-{host}-{dead}-abcd1234.tmp",
            "dead_other_name": f".style.safetensors.rt-{host}-{dead}-efgh5678.tmp",
            # ours, another process's save in progress on this host: kept, however old
            "alive": f".res_tuner.safetensors.rt-{host}-{alive.pid}-ijkl9012.tmp",
            # ours, from another host (shared folder): kept while recent, removed once old
            "other_host_recent": f".res_tuner.safetensors.rt-elsewhere-{dead}-mnop3456.tmp",
            "other_host_old": f".res_tuner.safetensors.rt-elsewhere-{dead}-qrst7890.tmp",
            # an older version's name (no owner): kept while recent, removed once old
            "legacy_recent": ".res_tuner.safetensors.a1b2c3d4.tmp",
            "legacy_old": ".res_tuner.safetensors.e5f6g7h8.tmp",
            # not ours: never touched
            "foreign_tmp": ".notes.txt.abcdefgh.tmp",
            "user_file": "res_tuner.safetensors.tmp",
            "dot_file": ".res_tuner.safetensors.bak",
        }
        for key, name in files.items():
            (tmp_path / name).write_bytes(b"partial")
            _age(
                tmp_path / name,
                2 * io.STALE_TEMPORARY_SECONDS
                if key.endswith("old") or key == "alive"
                else 2 * io.DEAD_WRITER_GRACE_SECONDS,
            )
        (tmp_path / ".a.safetensors.rt-x-1-folder000.tmp").mkdir()  # a folder with our name shape: not a file, kept
        rd.save_res_tuner(_unet_with_tuner(), tmp_path)
        gone = {"dead", "dead_other_name", "other_host_old", "legacy_old"}
        present = {p.name for p in tmp_path.iterdir()}
        for key, name in files.items():
            assert (name in present) == (key not in gone), key
        assert "res_tuner.safetensors" in present and ".a.safetensors.rt-x-1-folder000.tmp" in present
    finally:
        alive.kill()
        alive.wait()


def test_a_fresh_temporary_of_a_just_exited_writer_waits_for_the_grace_period(tmp_path):
    name = f".res_tuner.safetensors.rt-{io._host()}-{_dead_pid()}-abcd1234.tmp"
    (tmp_path / name).write_bytes(b"partial")
    assert io.remove_stale_temporaries(tmp_path) == []
    _age(tmp_path / name, 2 * io.DEAD_WRITER_GRACE_SECONDS)
    assert io.remove_stale_temporaries(tmp_path) == [tmp_path / name]
