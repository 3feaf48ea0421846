"""``sparse-lens trace`` arguments that are refused before the model loads (usage errors, exit 2)."""

import pytest

from sparse_lens.cli.main import main


def refused(arguments, monkeypatch, capsys) -> str:
    """Run ``sparse-lens trace`` with a model loader that fails the test if called; the usage error's text."""
    import sparse_lens as sl

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sl.HookedSparseTransformer, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exited:
        main(["trace", *arguments, "--device", "cpu"])
    assert exited.value.code == 2  # argparse's usage error, not a FileExistsError after the whole trace
    return capsys.readouterr().err


@pytest.mark.parametrize("out", ["a_file", "a_file/trace"])
def test_an_output_folder_that_is_a_file_or_under_one_is_refused(out, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    message = refused(["--out", str(tmp_path / out)], monkeypatch, capsys)
    assert f"{tmp_path / 'a_file'} is a file" in message
    assert (tmp_path / "a_file").read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [tmp_path / "a_file"]
