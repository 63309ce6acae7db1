"""The url-answer file store: size bound (oldest out first), expiry, names it accepts, and what it leaves."""

from __future__ import annotations

import os
import time

from ditserve.server.files import OutputStore


def test_size_bound_evicts_oldest_first(tmp_path):
    store = OutputStore(tmp_path, ttl=3600, max_bytes=250)
    names = [store.save(bytes([i]) * 100, "png") for i in range(4)]
    # 4 x 100 bytes into 250: each save makes room first, so the two newest remain.
    assert [store.read(n) is not None for n in names] == [False, False, True, True]
    assert store.total_bytes == 200 and len(store) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert store.read(names[3]) == bytes([3]) * 100


def test_names_are_random_and_only_store_names_are_read(tmp_path):
    store = OutputStore(tmp_path, ttl=3600, max_bytes=10**6)
    a, b = store.save(b"a", "png"), store.save(b"b", "webp")
    assert a != b and len(a) == 32 + len(".png") and b.endswith(".webp")
    (tmp_path / "notes.txt").write_text("private")
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    for bad in ("notes.txt", "../outside.png", "/etc/passwd", a + "/", "." + a, a.upper()):
        assert store.read(bad) is None, bad
    store.sweep()
    assert (tmp_path / "notes.txt").exists()  # files that are not the store's are never touched


def test_expiry_and_files_from_an_earlier_run(tmp_path):
    first = OutputStore(tmp_path, ttl=3600, max_bytes=10**6)
    old, fresh = first.save(b"old", "png"), first.save(b"fresh", "png")
    past = time.time() - 7200
    os.utime(tmp_path / old, (past, past))
    second = OutputStore(tmp_path, ttl=3600, max_bytes=10**6)  # a restart over the same folder
    assert not (tmp_path / old).exists()  # expired at start-up
    assert second.read(fresh) == b"fresh" and second.total_bytes == len(b"fresh")
    short = OutputStore(tmp_path, ttl=0.2, max_bytes=10**6)
    name = short.save(b"x", "jpeg")
    time.sleep(0.3)
    assert short.sweep() >= 1 and not (tmp_path / name).exists()


def test_temporary_folder_is_removed_and_a_given_one_kept(tmp_path):
    temp = OutputStore(None, ttl=3600, max_bytes=10**6)
    temp.save(b"x", "png")
    root = temp.root
    assert root.is_dir()
    temp.close()
    assert not root.exists()
    given = OutputStore(tmp_path / "out", ttl=3600, max_bytes=10**6)
    name = given.save(b"x", "png")
    given.close()
    assert (tmp_path / "out" / name).exists()
