"""Hardening of the command line and the files it writes (issue 21): disk and permission
faults, config types, option ranges, identity names, foreign SQLite files, trial-list headers,
atomic writes, bad files in a folder, and the learning-rate schedule on resume."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelab import api
from facelab.cli import main
from facelab.fileio import atomic_write_text
from facelab.models.checkpoint import save_checkpoint
from facelab.models.face_model import FaceModel

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model() -> FaceModel:
    torch.manual_seed(0)
    return FaceModel.create("mobilefacenet", embedding_dim=32, input_size=32).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", tiny_model())


def write_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- 7: disk and permission faults ------------------------------------------------------------


UNWRITABLE = {
    # tests run as root, where chmod stops no write: a regular file in the way, and /sys
    "file_in_the_way": lambda tmp: tmp / "a_file" / "out.npz",
    "read_only_fs": lambda tmp: Path("/sys/facelab-test/out.npz"),
}


@pytest.mark.parametrize("where", sorted(UNWRITABLE))
def test_unwritable_output_is_refused_before_any_work(
    tmp_path: Path,
    checkpoint: Path,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "a_file").write_text("x")
    out = UNWRITABLE[where](tmp_path)
    images = write_images(tmp_path / "images")
    trials = tmp_path / "trials.csv"
    trials.write_text(f"{images[0]},{images[1]},1\n{images[0]},{images[2]},0\n")

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(api, "load_model", no_work)
    monkeypatch.setattr("facelab.data.check.check_dataset", no_work)
    commands = {
        "embed": ["embed", str(tmp_path / "images"), "--out", str(out), "--model", "x"],
        "score": ["score", "x", str(trials), "--out", str(out)],
        "eval": ["eval", "x", str(trials), "--out", str(out.parent)],
        "data check": ["data", "check", str(tmp_path / "images"), "--out", str(out)],
        "enroll": ["enroll", "--gallery", str(out), "--model", "x", "--name", "a", str(images[0])],
        "train": ["train", "--data", str(tmp_path / "images"), "--out", str(out.parent)],
    }
    for name, argv in commands.items():
        caplog.clear()
        assert main(argv) == 2, name
        (line,) = error_lines(caplog)
        assert str(out.parent) in line and "cannot write here" in line, (name, line)


@pytest.mark.parametrize("command", ["embed", "eval", "score"])
def test_disk_full_at_write_time_is_one_line_naming_the_file(
    tmp_path: Path,
    checkpoint: Path,
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = write_images(tmp_path / "images")
    trials = tmp_path / "trials.csv"
    trials.write_text(f"{images[0]},{images[1]},1\n{images[0]},{images[2]},0\n")
    folder = tmp_path / "out"
    out = {"embed": folder / "emb.npz", "eval": folder / "metrics.json", "score": folder / "s.csv"}
    argv = {
        "embed": ["embed", str(images[0].parent), "--out", str(out["embed"]), "--model"],
        "eval": ["eval", "--out", str(folder)],
        "score": ["score", "--out", str(out["score"])],
    }[command]
    argv += [str(checkpoint)] if command == "embed" else [str(checkpoint), str(trials)]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the write itself fails after all the work
    assert main(argv) == 2
    assert error_lines(caplog) == [f"{out[command]}: No space left on device"]
    assert os.listdir(folder) == []  # no temporary left behind


def test_gallery_database_fault_is_one_line_naming_the_gallery(
    tmp_path: Path,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sqlite3

    from facelab.gallery.store import GalleryStore

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(GalleryStore, "add", full)
    gallery = tmp_path / "g.db"
    image = write_images(tmp_path / "images", 1)[0]
    argv = ["enroll", "--gallery", str(gallery), "--model", str(checkpoint), "--no-face", "centre"]
    assert main([*argv, "--name", "ada", str(image)]) == 2
    assert error_lines(caplog) == [f"{gallery}: database or disk is full"]


# -- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")
    path.chmod(0o644)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o644
    old_umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "fresh.json", "x")  # a new file: 0666 minus the umask
    finally:
        os.umask(old_umask)
    assert (tmp_path / "fresh.json").stat().st_mode & 0o777 == 0o644


def test_atomic_write_writes_through_a_symbolic_link(tmp_path: Path) -> None:
    target = tmp_path / "real" / "config.yaml"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "config.yaml"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_atomic_write_removes_temporaries_of_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    # a writer killed mid-write (kill -9): its temporary stays, its process is gone
    child = (
        "import sys, time\n"
        "from facelab.fileio import atomic_write\n"
        "def write(fh):\n"
        "    fh.write(b'partial'); fh.flush(); print('writing', flush=True); time.sleep(60)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    (stale,) = tmp_path.glob(".out.csv.*.tmp")
    legacy = tmp_path / ".out.csv.abc123.tmp"  # an older facelab's name, without a process id
    legacy.write_text("x")
    os.utime(legacy, (0, 0))
    live = tmp_path / f".out.csv.{os.getppid()}.feed.tmp"  # a writer still running
    live.write_text("x")
    other = tmp_path / ".other.csv.1.aaaa.tmp"  # another file's temporary
    other.write_text("x")
    atomic_write_text(path, "done")
    assert path.read_text() == "done"
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()


def test_check_writable_refuses_a_folder(tmp_path: Path) -> None:
    from facelab.fileio import check_writable

    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        check_writable(tmp_path)


# -- 8: training config types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("epochs=abc", "command line: epochs must be an integer, not 'abc'"),
        ("lr=abc", "command line: lr must be a number, not 'abc'"),
        ("augment=5", "command line: augment must be a mapping, not 5"),
        ("image_size=48.5", "command line: image_size must be an integer, not 48.5"),
        ("amp=1", "command line: amp must be a boolean (true/false), not 1"),
        ("exclude_people=x.txt", "command line: exclude_people must be a list of strings"),
        ("lr=.nan", "command line: lr must be a number, not nan"),
        ("lr=[", "--set lr=[: not a YAML value"),
        ("augment={flp: true}", "command line: unknown augment option(s): flp (known: flip,"),
        ("augment={rotate: x}", "command line: augment.rotate must be a number, not 'x'"),
        ("augment={crop_scale: [1]}", "command line: augment.crop_scale must be a list of 2"),
        ("backbone_options={widht: 1}", "backbone 'mobilefacenet': got an unexpected keyword"),
    ],
)
def test_wrong_config_types_name_field_type_and_value(
    tmp_path: Path, setting: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import write_synthetic_folder

    data = write_synthetic_folder(tmp_path / "data", people=2, per_person=2, size=8)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--set", setting]
    assert main(argv) == 2
    (line,) = error_lines(caplog)
    assert line.startswith(message), line


def test_config_values_that_fit_are_converted() -> None:
    from facelab.train.config import TrainConfig

    cfg = TrainConfig.from_dict({"lr": "1e-3", "max_minutes": 5, "eta_min": 0})  # YAML 1.1: str
    assert (cfg.lr, cfg.max_minutes, cfg.eta_min) == (0.001, 5.0, 0.0)
    assert isinstance(cfg.max_minutes, float)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"lr: 0.1\nepochs: [1\nx: 2\n", "bad.yaml:3:2: not valid YAML"),
        (b"lr: \xff\xfe\n", "bad.yaml: not a UTF-8 text file"),
        (b"epochs: ten\n", "bad.yaml: epochs must be an integer, not 'ten'"),
    ],
)
def test_broken_yaml_config_names_file_and_line(
    tmp_path: Path, content: bytes, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    argv = ["train", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path)]
    assert main(argv) == 2
    (line,) = error_lines(caplog)
    assert line.startswith(str(tmp_path / message)), line


def test_a_yaml_key_that_is_not_a_name_is_an_unknown_option(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`null: 5` is YAML for {None: 5}: named as an unknown option, not a TypeError from sorting or
    joining it with the option names (found by test_fuzz_parsing)."""
    config = tmp_path / "odd.yaml"
    config.write_text("epochs: 2\nnull: 5\n")
    argv = ["train", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path)]
    assert main(argv) == 2
    (line,) = error_lines(caplog)
    assert line == f"{config}: unknown training option(s): None", line


# -- 9 and --threshold nan: option ranges -----------------------------------------------------


def noisy_people(n: int, per_person: int = 2) -> dict[str, list[np.ndarray]]:
    """n synthetic 'people', each a random pattern with per_person noisy variants."""
    out = {}
    for p in range(n):
        rng = np.random.default_rng(p)
        base = rng.integers(0, 255, (36, 36, 3))
        out[f"person_{p}"] = [
            np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
            for _ in range(per_person)
        ]
    return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facelab.gallery import enroll_people

    path = tmp_path_factory.mktemp("gallery") / "g.db"
    enroll_people(path, tiny_model(), noisy_people(3), no_face="centre", progress=False)
    return path


@pytest.mark.parametrize("k", [0, -3])
def test_identify_k_below_one_is_refused(gallery: Path, k: int) -> None:
    from facelab.gallery import identify

    probe = noisy_people(1)["person_0"][:1]
    assert len(identify(gallery, tiny_model(), probe, k=2, threshold=0.5, no_face="centre")) == 1
    with pytest.raises(ValueError, match=rf"k \(candidates per face\) must be .* >= 1, not {k}"):
        identify(gallery, tiny_model(), probe, k=k, threshold=0.5, no_face="centre")


@pytest.mark.parametrize(
    "option", [["-k", "0"], ["-k", "-3"], ["--threshold", "nan"], ["--threshold", "inf"]]
)
def test_cli_refuses_k_below_one_and_non_finite_thresholds(
    gallery: Path, tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_images(tmp_path, 1)[0]
    with pytest.raises(SystemExit) as exit_:
        main(["identify", "--gallery", str(gallery), *option, str(image)])
    assert exit_.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_api_refuses_non_finite_thresholds(gallery: Path) -> None:
    from facelab.gallery import GalleryStore
    from facelab.gallery.service import resolve_threshold

    model = tiny_model()
    image = noisy_people(1)["person_0"][0]
    with GalleryStore(gallery) as store:
        assert resolve_threshold(store, threshold=0.5).value == 0.5
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="threshold must be a finite number"):
                resolve_threshold(store, threshold=bad)
    assert api.verify(model, image, image, threshold=0.5).same
    with pytest.raises(ValueError, match="threshold must be a finite number, not nan"):
        api.verify(model, image, image, threshold=float("nan"))


# -- 10, 11: identity names -------------------------------------------------------------------

NFC, NFD = "Zo\u00eb", "Zoe\u0308"  # one name, composed and decomposed


def fresh_gallery(tmp_path: Path, names: list[str]) -> Path:
    from facelab.gallery import enroll_people

    people = noisy_people(len(names), per_person=1)
    path = tmp_path / "g.db"
    enroll_people(
        path,
        tiny_model(),
        {name: images for name, images in zip(names, people.values(), strict=True)},
        no_face="centre",
        progress=False,
    )
    return path


@pytest.mark.parametrize("new", ["unknown", "Unknown", "", " Bob", "Bob ", "a\tb", "a\nb"])
def test_rename_applies_the_enroll_name_rules(
    tmp_path: Path, new: str, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = fresh_gallery(tmp_path, ["ada"])
    assert main(["gallery", "rename", "--gallery", str(gallery), "ada", new]) == 2
    assert main(["gallery", "list", "--gallery", str(gallery)]) == 0
    assert capsys.readouterr().out.splitlines() == ["ada\t1"]


def test_rename_stores_the_nfc_form(tmp_path: Path) -> None:
    from facelab.gallery import GalleryStore

    gallery = fresh_gallery(tmp_path, ["ada"])
    with GalleryStore(gallery) as store:
        store.rename("ada", NFD)
        assert [i.name for i in store.identities()] == [NFC]


@pytest.mark.parametrize("bad", ["Ada ", " Ada", "Ada\tLovelace", "Ada\nL", "unknown", ""])
def test_enroll_refuses_names_breaking_the_rules(tmp_path: Path, bad: str) -> None:
    from facelab.gallery import GalleryError

    with pytest.raises(GalleryError, match="cannot be an identity name"):
        fresh_gallery(tmp_path, [bad])
    assert not (tmp_path / "g.db").exists()


def test_nfc_and_nfd_spellings_are_one_identity(tmp_path: Path) -> None:
    from facelab.gallery import GalleryError, GalleryStore, enroll

    gallery = fresh_gallery(tmp_path, [NFC])
    image = noisy_people(2)["person_1"][:1]
    with pytest.raises(GalleryError, match="already enrolled"):
        enroll(gallery, tiny_model(), NFD, image, no_face="centre", progress=False)
    enroll(gallery, tiny_model(), NFD, image, append=True, no_face="centre", progress=False)
    with GalleryStore(gallery) as store:
        assert [(i.name, i.images) for i in store.identities()] == [(NFC, 2)]


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        (["Ada", "Ada "], "'Ada ' cannot be an identity name (leading or trailing whitespace)"),
        ([NFC, NFD], f"{NFD!a} and {NFC!a} are one name, {NFC!r}"),
    ],
)
def test_enroll_tree_reports_folders_that_collide(
    tmp_path: Path,
    checkpoint: Path,
    folders: list[str],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "people"
    for name in folders:
        write_images(root / name, 1)
    gallery = tmp_path / "g.db"
    argv = ["enroll", "--gallery", str(gallery), "--model", str(checkpoint), "--tree", str(root)]
    assert main([*argv, "--no-face", "centre"]) == 2
    (line,) = error_lines(caplog)
    assert line.startswith(f"{root}: identity folders: ") and message in line, line
    assert not gallery.exists()


# -- 12: foreign and read-only SQLite files ---------------------------------------------------


def test_another_applications_sqlite_file_is_refused_unchanged(tmp_path: Path) -> None:
    import sqlite3

    from facelab.gallery import GalleryError, GalleryStore

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
    db.close()
    before = other.read_bytes()
    with pytest.raises(GalleryError, match="app.db: an SQLite file, but not a facelab gallery"):
        GalleryStore(other)
    assert main(["gallery", "list", "--gallery", str(other)]) == 2
    assert other.read_bytes() == before  # still in rollback-journal mode, not switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


@pytest.fixture()
def as_nobody() -> object:
    """Run a block with the effective user `nobody` (tests run as root, whom no permission
    stops), then root again."""
    import contextlib

    @contextlib.contextmanager
    def block():  # noqa: ANN202
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)

    return block


def test_read_only_gallery_stays_readable_and_unchanged(
    as_nobody, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil
    import tempfile

    from facelab.gallery import GalleryError, GalleryStore, identify

    folder = Path(tempfile.mkdtemp(prefix="facelab-ro-"))  # not under root's 0700 tmp folder
    try:
        folder.chmod(0o755)
        gallery = fresh_gallery(folder, ["ada", "bob"])
        gallery.chmod(0o444)
        folder.chmod(0o555)
        before = gallery.read_bytes()
        probe = noisy_people(1)["person_0"][:1]
        model = tiny_model()
        with as_nobody():
            with GalleryStore(gallery) as store:
                assert store.read_only
                assert [i.name for i in store.identities()] == ["ada", "bob"]
                with pytest.raises(GalleryError, match="g.db: the gallery file is read-only"):
                    store.rename("ada", "eve")
            (result,) = identify(gallery, model, probe, threshold=0.0, no_face="centre")
            assert result.identity == "ada"
            assert main(["gallery", "list", "--gallery", str(gallery)]) == 0
        assert capsys.readouterr().out.split() == ["ada", "1", "bob", "1"]
        assert gallery.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["g.db"]
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_failed_first_enroll_leaves_no_gallery_file(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_images(tmp_path / "images", 1)[0]
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"not an image")
    gallery = tmp_path / "g.db"
    argv = ["enroll", "--gallery", str(gallery), "--model", str(checkpoint), "--no-face", "centre"]
    assert main([*argv, "--name", "ada", str(good), str(bad)]) == 2
    assert "broken.png" in error_lines(caplog)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert main([*argv, "--name", "ada", str(good)]) == 0
    assert gallery.is_file()


# -- 13 and file-naming errors: trial lists and CSVs ------------------------------------------


def test_headerless_suffixless_trial_list_keeps_every_trial(
    tmp_path: Path, checkpoint: Path
) -> None:
    for i, path in enumerate(write_images(tmp_path, 4)):
        path.rename(tmp_path / f"img{i}")  # image files without a suffix
    trials = tmp_path / "trials.txt"
    trials.write_text("img0 img1\nimg1 img2\nimg2 img3\n")
    out = tmp_path / "scores.csv"
    assert main(["score", str(checkpoint), str(trials), "--out", str(out)]) == 0
    ids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert ids == ["img0 img1", "img1 img2", "img2 img3"]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("img1,img2\na.jpg,b.jpg\n", ["a.jpg"]),  # a header above named images
        ("img1,img2,label\na,b,1\nc,d,0\n", ["a", "c"]),  # a label column that is no number
        ("a,b\nc,d\n", ["a", "c"]),  # suffixless names: all data
        ("a,b,1\nc,d,0\n", ["a", "c"]),
        ("a b\n", ["a"]),  # a single suffixless trial
        ("first.jpg,second.jpg\n", ["first.jpg"]),
    ],
)
def test_header_rule_never_takes_a_trial_for_a_header(
    tmp_path: Path, text: str, kept: list[str]
) -> None:
    from facelab.data.trials import iter_trial_rows

    (tmp_path / "t.csv").write_text(text)
    assert [row[0] for _, row in iter_trial_rows(tmp_path / "t.csv")] == kept


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("trials.csv", b"a.jpg,b.jpg,1\nc.jpg,d\xff.jpg,0\n", "trials.csv:2: not UTF-8 text"),
        ("pairs.txt", b"1 1\nAda 1 x\nAda 1 Bob 2\n", "pairs.txt:2: image numbers must be"),
        ("pairs.txt", b"1 1\nAda 1 2\nAda \xe9 Bob 2\n", "pairs.txt:3: not UTF-8 text"),
        ("trials.csv", b"a.jpg,b.jpg,0.5\n", "trials.csv:1: label '0.5' is not 0 or 1"),
        ("pairs.txt", b"0\n", "pairs.txt:1: the header promises no pairs"),  # found by fuzzing
        ("pairs.txt", b"10 0\n", "pairs.txt:1: the header promises no pairs"),
    ],
)
def test_trial_list_errors_name_the_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    from facelab.data.trials import read_trials

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"^{tmp_path / message}"):
        read_trials(tmp_path / name)


def test_labels_csv_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    from facelab.data.layout import read_labels

    (tmp_path / "labels.csv").write_bytes(b"image,identity\na.jpg,Ren\xe9\n")
    with pytest.raises(ValueError, match=f"^{tmp_path}/labels.csv:2: not UTF-8 text"):
        read_labels(tmp_path / "labels.csv")


# -- embed --skip-bad -------------------------------------------------------------------------


def test_embed_stops_at_a_bad_file_unless_told_to_skip(
    tmp_path: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "images"
    good = write_images(folder, 3)
    for name in ("1a_broken.png", "2a_empty.jpg"):
        (folder / name).write_bytes(b"" if "empty" in name else b"not an image")
    out = tmp_path / "emb.npz"
    argv = ["embed", str(folder), "--out", str(out), "--model", str(checkpoint), "--eager"]
    assert main(argv) == 2
    (line,) = error_lines(caplog)
    assert line.startswith(str(folder / "1a_broken.png")) and not out.exists()
    capsys.readouterr()
    assert main([*argv, "--skip-bad", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == [str(folder / "1a_broken.png"), str(folder / "2a_empty.jpg")]
    assert report["images"] == 3
    with np.load(out) as data:
        assert list(data["paths"]) == [str(p) for p in good]
        assert data["embeddings"].shape == (3, 32) and data["routes"].shape == (3,)
    alone = api.embed(api.load_model(str(checkpoint)), good)
    with np.load(out) as data:
        np.testing.assert_allclose(data["embeddings"], alone, atol=1e-5)


# -- learning rate on resume ------------------------------------------------------------------


def test_resume_with_more_epochs_never_raises_the_learning_rate(tmp_path: Path) -> None:
    from conftest import write_synthetic_folder

    from facelab.train import TrainConfig, train

    data = write_synthetic_folder(tmp_path / "data", people=4, per_person=8, size=32)
    base = {
        "data": str(data),
        "out": str(tmp_path / "run"),
        "backbone": "resnet18",
        "backbone_options": {"width": 0.25},
        "embedding_dim": 16,
        "image_size": 32,
        "batch_size": 8,
        "lr": 0.05,
        "eta_min": 1e-4,
        "scheduler": "cosine",
        "warmup_epochs": 0.5,
        "val_fraction": 0.0,
        "augment": {"flip": True},
        "workers": 1,
    }
    last = tmp_path / "run" / "last.pt"
    # planned for 4 epochs, stopped after the first by its time budget, resumed to 6 epochs
    first = train(TrainConfig(**base, epochs=4, max_minutes=0.0))
    assert len(first.history) == 1
    resumed = train(TrainConfig(**base, epochs=6), resume=last)
    lrs = [r["lr"] for r in resumed.history]
    assert len(lrs) == 6 and lrs[0] == first.history[0]["lr"]
    assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-6)  # eta_min at the new last epoch
    # a finished run extended: stays at eta_min
    extended = train(TrainConfig(**base, epochs=8), resume=last)
    assert [r["lr"] for r in extended.history[6:]] == pytest.approx([1e-4, 1e-4], rel=1e-6)
