"""scratchlm.native: C kernels are built once per source/flags/CPU, loaded with their signatures,
and a missing compiler or a switched-off build gives None (callers fall back to torch)."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from scratchlm import native

SOURCE_TEXT = "int demo_version(void) { return 7; }\nint demo_add(int a, int b) { return a + b; }\n"
SIGNATURES = {"demo_version": ([], ctypes.c_int), "demo_add": ([ctypes.c_int, ctypes.c_int], ctypes.c_int)}


def load(source, version=7):
    return native.load_library(source, compile_flags=["-O2"], signatures=SIGNATURES,
                               version_function="demo_version", version=version, purpose="demo kernels")


@pytest.fixture
def demo_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SCRATCHLM_NATIVE", raising=False)
    source = tmp_path / "demo.c"
    source.write_text(SOURCE_TEXT)
    return source


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_builds_once_and_binds_signatures(demo_source):
    lib = load(demo_source)
    assert lib is not None and lib.demo_add(40, 2) == 42
    (built,) = native.cache_dir().glob("demo-*.so")
    stamp = built.stat().st_mtime_ns
    assert load(demo_source).demo_add(1, 2) == 3
    assert built.stat().st_mtime_ns == stamp  # cached, not rebuilt
    demo_source.write_text(SOURCE_TEXT + "int demo_other(void) { return 1; }\n")
    load(demo_source)
    assert len(list(native.cache_dir().glob("demo-*.so"))) == 2  # a changed source gets its own build


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_version_mismatch_means_no_library(demo_source):
    assert load(demo_source, version=8) is None


def test_missing_compiler_warns_and_returns_none(demo_source, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="demo kernels unavailable"):
        assert load(demo_source) is None


def test_switched_off_returns_none_without_building(demo_source, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_NATIVE", "0")
    assert load(demo_source) is None
    assert not native.cache_dir().exists()
