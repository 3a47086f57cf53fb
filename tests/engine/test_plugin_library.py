"""Where the plugin library is looked for, and that it is opened once per process."""

import ctypes
import os

import pytest

from trt_twotower.engine import plugin_library
from trt_twotower.engine.plugin_library import (DEFAULT_PLUGIN_LIBRARY, PLUGIN_LIBRARY_ENV,
                                                PluginLibraryError, find_plugin_library,
                                                load_plugin_library,
                                                plugin_library_path)


def test_default_path_is_absolute_and_where_the_build_script_writes(monkeypatch, tmp_path):
    monkeypatch.delenv(PLUGIN_LIBRARY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    assert plugin_library_path() == DEFAULT_PLUGIN_LIBRARY
    assert DEFAULT_PLUGIN_LIBRARY.is_absolute()
    repository = DEFAULT_PLUGIN_LIBRARY.parents[2]
    assert (repository / "build_scripts" / "build_plugins.sh").is_file()
    assert DEFAULT_PLUGIN_LIBRARY.relative_to(repository).as_posix() == \
        "build/plugins/libtwotower_plugins.so"


def test_missing_library_raises_naming_the_path_and_the_fix(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libtwotower_plugins.so"
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, str(missing))
    with pytest.raises(PluginLibraryError) as err:
        find_plugin_library()
    assert str(missing) in str(err.value)
    assert "build_scripts/build_plugins.sh" in str(err.value)
    assert PLUGIN_LIBRARY_ENV in str(err.value)
    with pytest.raises(PluginLibraryError, match="nowhere"):
        load_plugin_library()


def test_relative_env_var_is_resolved_against_the_working_directory(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    library = tmp_path / "lib" / "libtwotower_plugins.so"
    library.write_bytes(b"not really a library")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, os.path.join("lib", "libtwotower_plugins.so"))
    found = find_plugin_library()
    assert found.is_absolute() and found == library.resolve()


def test_the_library_is_opened_once_per_file(monkeypatch, tmp_path):
    opened = []

    class FakeLibrary:
        def __init__(self, path):
            opened.append(path)

    monkeypatch.setattr(ctypes, "CDLL", FakeLibrary)
    monkeypatch.setattr(plugin_library, "_declare", lambda lib: None)
    library = tmp_path / "libtwotower_plugins.so"
    library.write_bytes(b"")
    monkeypatch.setenv(PLUGIN_LIBRARY_ENV, str(library))
    first = load_plugin_library()
    assert load_plugin_library() is first and load_plugin_library(library) is first
    assert opened == [str(library)]
