"""What the CLI tests share: a bad input costs exactly one line on stderr."""


def one_line(capsys, *words) -> str:
    """The one stderr line a command printed (asserted to be one line), after checking it names `words`."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err
