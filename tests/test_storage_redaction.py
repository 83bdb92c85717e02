"""``--storage`` URLs never show their password: not in error lines, not in results.md's command line,
not in any file of the results folder, not in the study's attributes. Every place a password can sit
in a database URL: after ``user:``, with an ``@`` inside it (written raw or as ``%40``), and as a query
parameter (``?password=`` for PostgreSQL, ``?passwd=`` for MySQL drivers)."""

import pytest

from bench.study import redact
from conftest import run_cli
from tests.test_study import SMOKE, postgres_url  # noqa: F401  (a fixture: a throwaway PostgreSQL server)

# form -> (URL, strings that must not appear, strings that must)
FORMS = {
    "user:password": ("postgresql://alice:topsecret@db.example.org:5432/bench", ["topsecret"]),
    "password with a raw @": ("postgresql://alice:p@ss-word@db.example.org/bench", ["p@ss", "ss-word"]),
    "password with raw @ and /": ("postgresql://alice:p@ss/w0rd@db.example.org/bench", ["p@ss", "w0rd"]),
    "password with %40": ("postgresql://alice:p%40ss-word@db.example.org/bench", ["p%40ss", "p@ss", "ss-word"]),
    "?password=": ("postgresql://alice@db.example.org/bench?sslmode=require&password=topsecret", ["topsecret"]),
    "?passwd= (MySQL)": ("mysql+pymysql://alice@db.example.org/bench?passwd=topsecret&charset=utf8mb4", ["topsecret"]),
    "both at once": ("postgresql://alice:first-secret@db.example.org/bench?password=second-secret", ["first-secret", "second-secret"]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_redact_hides_every_form_of_password(form):
    url, secrets = FORMS[form]
    shown = redact(url)
    for secret in secrets:
        assert secret not in shown, shown
    assert "alice" in shown and "db.example.org" in shown and "***" in shown  # still says where it points


def test_redact_leaves_urls_without_a_password_alone():
    for url in ("postgresql://alice@db.example.org/bench", "sqlite:////tmp/study.db", "mysql://db.example.org/bench?charset=utf8mb4"):
        assert redact(url) == url


@pytest.mark.parametrize("form", list(FORMS))
def test_results_command_line_hides_the_password(form):
    from bench.report import command_line

    url, secrets = FORMS[form]
    for argv in (["--suite", "shapes", "--storage", url, "--worker"], ["--suite", "shapes", f"--storage={url}"]):
        text = command_line(argv)
        assert text.startswith("python run_bench.py --suite shapes ") and "--storage" in text
        for secret in secrets:
            assert secret not in text, text


@pytest.mark.parametrize("url, secrets", [
    ("postgresql://u@127.0.0.1:1/x?password=topsecret", ["topsecret"]),
    ("postgresql://u:p@ss-word@127.0.0.1:1/x", ["p@ss", "ss-word"]),
    ("mysql+pymysql://u:top%40secret@127.0.0.1:1/x?passwd=other-secret", ["top%40secret", "top@secret", "other-secret"]),
], ids=["query", "raw @", "mysql %40 + query"])
def test_storage_errors_never_show_the_password(tmp_path, url, secrets):
    out = tmp_path / "out"
    done = run_cli(*SMOKE, "--storage", url, "--out", str(out), timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "--storage" in lines[0] and "Traceback" not in done.stderr
    for secret in secrets:
        assert secret not in done.stdout + done.stderr, lines[0]
    assert not out.exists()


def test_a_raw_at_sign_in_the_password_is_refused_with_the_fix(tmp_path):
    """``user:p@ss@host``: SQLAlchemy reads password ``p`` and host ``ss@host`` (and would print that
    host in its error); the URL is refused before any connection, with the encoding to use."""
    done = run_cli(*SMOKE, "--storage", "postgresql://u:p@ss-word@127.0.0.1:1/x", "--out", str(tmp_path / "out"), timeout=300)
    assert "%40" in done.stderr and "ss-word" not in done.stderr


def test_a_run_on_postgresql_writes_the_password_nowhere(tmp_path, postgres_url):  # noqa: F811
    """The ``?password=`` form through a whole run: results.md's command line, every file of the results
    folder, the output, and every study and trial attribute in the database."""
    import optuna

    secret = "qp-s3cret-9f2"
    url = postgres_url.replace("bench:s3cret-pw@", "bench@") + f"?password={secret}"
    out = tmp_path / "out"
    done = run_cli(*SMOKE, "--targets", "qv", "--vision", "frozen", "--storage", url, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    command = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("Command:"))
    assert secret not in command and "--storage 'postgresql://bench@127.0.0.1" in command, command
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                import gzip

                data = gzip.decompress(data)
            assert secret.encode() not in data, path
    assert optuna.get_all_study_summaries(postgres_url)
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as db:  # every row of every table Optuna keeps: study and trial attributes, params...
        tables = sqlalchemy.inspect(db).get_table_names()
        assert "trial_user_attributes" in tables
        for table in tables:
            rows = db.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')).fetchall()
            assert secret not in repr(rows), table
    engine.dispose()
