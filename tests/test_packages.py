"""Long documents from folders: packages as documents, held out by package, and the lengths of both splits."""

import random
import zlib

import pytest

from block_recurrent.training.data import Document
from block_recurrent.training.packages import (
    FILE_SEPARATOR, PACKAGE_VALIDATION_PERCENT, format_lengths, group_packages, length_distribution, package_of,
    source_documents, split_packages, split_source,
)
from block_recurrent.training.train_config import TrainConfig


def files(names):
    return [Document(name, f"text of {name}\n") for name in names]


NAMES = ["top.py", "email/__init__.py", "email/mime/text.py", "email/charset.py", "json/decoder.py",
         "test/test_os.py", "test/test_email/test_message.py", "test/test_email/__init__.py", "test/support/io.py"]


def test_a_package_is_its_files_concatenated_in_path_order_with_a_separator():
    packages = group_packages(files(NAMES), nested=("test",))
    assert [p.name for p in packages] == ["email", "json", "test/support", "test/test_email"]
    email = packages[0].text
    assert email == "".join(f"{FILE_SEPARATOR}{name}\ntext of {name}\n"
                            for name in ("email/__init__.py", "email/charset.py", "email/mime/text.py"))
    # loose files (top.py, test/test_os.py) lie in no package: left out
    assert "top.py" not in "".join(p.text for p in packages) and "test_os" not in "".join(p.text for p in packages)


def test_grouping_is_deterministic_whatever_the_order_of_the_files():
    shuffled = files(NAMES)
    random.Random(3).shuffle(shuffled)
    assert group_packages(shuffled, nested=("test",)) == group_packages(files(NAMES), nested=("test",))


def test_depth_chooses_the_folders_that_are_documents():
    assert package_of("email/mime/text.py", 2) == "email/mime"
    assert package_of("email/charset.py", 2) is None
    assert package_of("test/test_email/x.py", 1, nested=("test",)) == "test/test_email"
    assert [p.name for p in group_packages(files(NAMES), depth=2)] == ["email/mime", "test/support", "test/test_email"]
    with pytest.raises(ValueError, match="package_depth"):
        group_packages(files(NAMES), depth=0)


def test_packages_are_held_out_whole_and_no_file_is_in_both_splits():
    names = [f"pkg{p}/mod{m}.py" for p in range(40) for m in range(3)]
    train, held_out = split_packages(group_packages(files(names)))
    assert {d.name for d in held_out} == {f"pkg{p}" for p in range(40)
                                          if zlib.crc32(f"pkg{p}".encode()) % 100 < PACKAGE_VALIDATION_PERCENT}
    file_names = lambda docs: {line[1:] for d in docs for line in d.text.split("\n") if line.startswith(FILE_SEPARATOR)}
    assert file_names(train).isdisjoint(file_names(held_out))
    assert file_names(train) | file_names(held_out) == set(names)
    with pytest.raises(ValueError, match="package"):
        split_packages(group_packages(files(["only/a.py"])))


def test_a_data_folder_as_packages(tmp_path):
    for name in ["a/x.txt", "a/y.txt", "b/c/z.txt", "loose.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    with pytest.warns(UserWarning, match="left out 1 files"):
        packages = source_documents(str(tmp_path), documents="package")
    assert [p.name for p in packages] == ["a", "b"]
    assert packages[1].text == f"{FILE_SEPARATOR}b/c/z.txt\nb/c/z.txt\n"
    assert len(source_documents(str(tmp_path))) == 4  # files, as before
    assert source_documents(str(tmp_path / "loose.txt"), documents="package")[0].name == "loose.txt"  # a file is one
    with pytest.raises(ValueError, match="no folder at package_depth=3"):
        source_documents(str(tmp_path), documents="package", package_depth=3)
    with pytest.raises(ValueError, match="documents must be one of"):
        source_documents(str(tmp_path), documents="folder")
    with pytest.raises(ValueError, match="Hugging Face"):
        source_documents(hf_dataset="x", documents="package")
    train, held_out = split_source(packages, "package")
    assert len(train) == len(held_out) == 1


def test_train_config_checks_the_documents_settings():
    assert TrainConfig(documents="package", package_depth=2).package_depth == 2
    with pytest.raises(ValueError, match="documents"):
        TrainConfig(documents="packages")
    with pytest.raises(ValueError, match="package_depth"):
        TrainConfig(documents="package", package_depth=0)
    with pytest.raises(ValueError, match="hf_dataset"):
        TrainConfig(documents="package", hf_dataset="x")


def test_length_distribution_of_both_splits():
    docs = [Document(str(n), "x" * n) for n in (10, 2000, 5000, 300_000)]
    stats = length_distribution(docs)
    assert (stats["documents"], stats["bytes"], stats["min"], stats["max"]) == (4, 307_010, 10, 300_000)
    assert stats["median"] == 3500
    assert [(low, n) for low, _, n, _ in stats["buckets"]] == [(0, 1), (1024, 1), (4096, 1), (16384, 0), (65536, 0),
                                                               (262144, 1)]
    table = format_lengths({"train": docs, "held out": docs[:1]})
    assert "| train | 4 |" in table and "| held out | 1 |" in table
