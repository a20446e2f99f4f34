import os
import subprocess
import time

import pytest

try:
    from tests.pgserver import PgServer, as_pg_user, find_pg_bin, pg_available
except ImportError:  # tests/ is not a package
    from pgserver import PgServer, as_pg_user, find_pg_bin, pg_available

_ok, _reason = pg_available()


@pytest.mark.postgres
@pytest.mark.skipif(not _ok, reason=_reason or "PostgreSQL not available")
def test_pgserver_start_create_query_stop():
    t0 = time.monotonic()
    server = PgServer().start()
    started = time.monotonic()
    try:
        assert server.running
        tmpdir, port = server.tmpdir, server.port
        assert os.path.isdir(tmpdir)

        url = server.create_database("skillbank_test")
        assert url == f"postgresql+psycopg://skillbank@127.0.0.1:{port}/skillbank_test"

        psql = find_pg_bin("psql")
        out = subprocess.run(
            as_pg_user([psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port),
                        "-U", "skillbank", "-d", "skillbank_test", "-c", "select 1"]),
            capture_output=True, text=True, timeout=60, cwd=tmpdir,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
    finally:
        t1 = time.monotonic()
        server.stop()
        stopped = time.monotonic()
    server.stop()  # idempotent
    assert not server.running
    assert not os.path.exists(tmpdir)
    print(f"\npgserver: start {started - t0:.2f}s, stop {stopped - t1:.2f}s")
