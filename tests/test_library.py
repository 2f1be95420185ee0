"""The library's shared pieces, each written once: the house's layout, the data check, the process rank,
messages, JSON records, the safe image open and the machine's name."""

import ast
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, smooth_test_image
from ddpm import cli, distributed
from ddpm.data import ImageFiles, TrainingData, check_same_data, recorded_training_data
from ddpm.errors import UserError
from ddpm.files import write_json
from ddpm.imaging import load_image, open_image
from ddpm.machine import SPEED_FLAGS, cpu_name, cpu_speed_flags, describe

SCRIPTS = ("ddpm_train", "ddpm_infer", "ddpm_sample", "ddpm_export", "ddpm_explore")


def imported_modules(path):
    """The top-level names of every module a Python file imports (relative imports as '.')."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def python_files(folder):
    return sorted(os.path.join(REPO, folder, name) for name in os.listdir(os.path.join(REPO, folder))
                  if name.endswith(".py"))


def test_models_holds_networks_that_import_nothing_of_the_library():
    for path in python_files("models"):
        imports = imported_modules(path)
        assert not imports & {"ddpm", *SCRIPTS}, f"{path} imports {imports & {'ddpm', *SCRIPTS}}"
        assert imports <= {"math", "torch", "."}, f"{path}: a network needs torch, not {imports}"


def test_the_library_never_imports_a_script_and_every_module_says_what_it_holds():
    for path in python_files("ddpm") + python_files("models"):
        assert not imported_modules(path) & set(SCRIPTS), path
        docstring = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
        assert docstring and len(docstring.splitlines()[0]) > 20, f"{path} does not open with what it holds"


def one_image(tmp_path, name="cat.png", seed=0):
    path = tmp_path / name
    Image.fromarray(smooth_test_image(32, 32, seed)).save(path)
    return str(path)


def test_one_image_is_recorded_by_its_path_and_digest_and_found_again(tmp_path):
    data = TrainingData([one_image(tmp_path)], 16)
    assert data.record["image_path"] == data.paths[0] and data.record["image_sha256"] == data.identity
    again = recorded_training_data(data.record)
    assert again.paths == data.paths and again.identity == data.identity and again.names == data.names


def test_a_folder_is_found_as_typed_or_at_its_absolute_path(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [one_image(folder, f"{i}.png", seed=i) for i in range(3)]
    monkeypatch.chdir(tmp_path)
    data = TrainingData(paths, 16, image_dir="photos")
    assert data.names == ["0.png", "1.png", "2.png"] and data.record["image_dir_absolute"] == str(folder)
    assert recorded_training_data(data.record).identity == data.identity  # "photos", relative to here
    monkeypatch.chdir(REPO)  # "photos" means nothing here: the absolute path is used
    assert recorded_training_data(data.record).identity == data.identity


def test_the_data_check_says_what_changed_and_how_to_fix_it(tmp_path):
    image = one_image(tmp_path)
    record = TrainingData([image], 16).record
    Image.fromarray(smooth_test_image(32, 32, seed=1)).save(image)  # the same name, other pixels
    with pytest.raises(UserError, match=r"has changed since the model was trained on it \(restore it\)$"):
        recorded_training_data(record, fix="restore it")
    with pytest.raises(UserError, match="has changed since the run started, so it cannot continue exactly$"):
        check_same_data(record, TrainingData([image], 16), resumed=True)
    os.remove(image)
    with pytest.raises(UserError, match="which is not there$"):
        recorded_training_data(record)


def test_a_folder_with_a_file_gone_or_edited_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [one_image(folder, f"{i}.png", seed=i) for i in range(2)]
    record = TrainingData(paths, 16, image_dir=str(folder)).record
    shutil.copy(paths[0], paths[1])  # edited
    with pytest.raises(UserError, match="have changed since the model was trained on them"):
        recorded_training_data(record)
    os.remove(paths[1])
    with pytest.raises(UserError, match="is gone"):
        recorded_training_data(record)
    shutil.rmtree(folder)
    with pytest.raises(UserError, match="which is not there"):
        recorded_training_data(record)


def test_the_digest_is_read_only_when_asked_so_a_missing_file_is_reported_by_the_decoder(tmp_path):
    data = TrainingData([str(tmp_path / "missing.png")], 16)
    with pytest.raises(UserError, match="does not exist"):
        data.dataset()


@pytest.mark.parametrize("rank, world, main", [(None, None, True), ("0", "2", True), ("1", "2", False)])
def test_the_rank_is_read_in_one_way_and_only_process_0_speaks(monkeypatch, capsys, rank, world, main):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    expected = (int(rank or 0), int(world or 1))
    assert distributed.rank_and_world_size() == expected and distributed.is_main_process() == main
    assert distributed.launcher("ddpm_train.py") == (
        ["python", "ddpm_train.py"] if expected[1] == 1 else ["torchrun", "--nproc_per_node", "2", "ddpm_train.py"])
    cli.say("hello")
    cli.warn("careful")
    out, err = capsys.readouterr()
    assert (out, err) == (("hello\n", "warning: careful\n") if main else ("", ""))


def test_write_json_writes_a_whole_record_or_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json(path, {"a": 1, "b": [1.5, "x"]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, "x"]} and path.read_text().endswith("}\n")
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # cannot be written as JSON: fails half-way
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, "x"]}
    assert sorted(os.listdir(tmp_path)) == ["record.json"]  # no temporary file left


def test_one_safe_image_open_refuses_a_decompression_bomb_for_decoding_and_for_checking(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px now counts as enormous
    for read in (lambda: load_image(str(bomb), 16), lambda: ImageFiles([str(bomb)], 16, cache_bytes=0)):
        with pytest.raises(UserError, match="decompression bomb"):
            read()


def test_the_safe_open_names_an_unreadable_file(tmp_path):
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="cannot be read as an image"):
        with open_image(str(text)):
            pass


def test_the_machine_has_a_name():
    assert isinstance(cpu_name(), str) and cpu_name().strip()


def test_the_machine_names_the_speed_flags_its_cpu_has(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path,
                                                                          *a, **k))
    assert cpu_name() == "Some CPU" and cpu_speed_flags() == ["avx2", "avx512f", "avx512_bf16"]
    assert set(describe()) == {"cpu", "cpu_flags", "cores", "threads", "torch"}
    assert set(describe()["cpu_flags"]) <= set(SPEED_FLAGS)


def test_the_tuning_benchmark_knows_which_scripts_keep_freed_memory():
    """benchmarks/process_tuning.py flips keep_freed_memory() by taking it from the scripts that call it and
    giving it to the others: its list must be the code's."""
    from benchmarks import process_tuning

    scripts = ["ddpm_train.py", "ddpm_infer.py", "ddpm_sample.py"]
    calling = [script for script in scripts if "\n    keep_freed_memory()\n" in open(os.path.join(REPO, script)).read()]
    assert tuple(calling) == process_tuning.KEEPS_FREED_MEMORY
    assert sorted(argv[0] for argv in process_tuning.commands("scratch").values()) == sorted(scripts)
