from sparse_lens.cli.paths import file_in_the_way


def test_the_nearest_existing_path_blocks_only_when_it_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert file_in_the_way(tmp_path / "new" / "deeper") is None  # only folders above: mkdir can make it
    assert file_in_the_way(tmp_path) is None
    assert file_in_the_way(tmp_path / "a_file") == tmp_path / "a_file"
    assert file_in_the_way(tmp_path / "a_file" / "out" / "x") == tmp_path / "a_file"
