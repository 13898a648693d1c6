"""``ghostmatch serve``: the JSON API over HTTP against the real app on uvicorn and a real
index (bundled model), compared with the CLI's answers; every safety rule; micro-batching
and the full queue; index jobs, a changed index, actions and undo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_support import CLI, cli_env
from corpus import png_with_header_size
from serve_support import (
    XSS_NAME,
    Indexed,
    Server,
    build_index,
    copy_index,
    jpeg,
    model_env,
    serving,
)

# Every test uses the session's model cache: the ONNX export is made once.
pytestmark = pytest.mark.usefixtures("shared_model_cache")

TOKEN = "s3cret-token-for-tests"


def run_cli(model_cache: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *CLI,
            *(
                a if isinstance(a, str) else os.fspath(a) if isinstance(a, os.PathLike) else str(a)
                for a in args
            ),
        ],
        env=cli_env(model_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def env(model_cache: Path) -> Iterator[Path]:
    with model_env(model_cache):
        yield model_cache


@pytest.fixture(scope="module")
def indexed(env: Path, tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    return build_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(indexed: Indexed) -> Iterator[Server]:
    with serving(indexed.index) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def fresh(env: Path, indexed: Indexed, tmp_path: Path) -> Indexed:
    """A gallery and index of its own, for a test that changes files or the index."""
    return copy_index(indexed, tmp_path)


def upload(path: Path, name: str | None = None) -> dict[str, Any]:
    return {"image": (name or path.name, path.read_bytes(), "image/jpeg")}


def without_ids(answer: dict[str, Any], key: str) -> dict[str, Any]:
    return {**answer, key: [{k: v for k, v in m.items() if k != "id"} for m in answer[key]]}


# ---------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "options",
    [
        {"k": 4},
        {"k": 10, "min_score": 0.2},
        {"under": "copies"},
        {"k": 4, "plain": True},
        {"under": "copies", "plain": True},
        {"k": 4, "rerank": 20},
    ],
)
def test_query_by_upload_is_the_cli_answer(
    client: httpx.Client, indexed: Indexed, env: Path, tmp_path: Path, options: dict[str, Any]
) -> None:
    # A new photo, not indexed: a resized astronaut.
    photo = tmp_path / "new photo.jpg"
    photo.write_bytes(jpeg("astronaut", (300, 300), quality=80))
    params = dict(options)
    # The server refines as the command does, without the re-ranking unless asked
    # (rerank=N is its --rerank N); plain=true is its --plain.
    args: list[object] = ["query", photo, "--index", indexed.index, "--json"]
    if params.get("plain"):
        args.append("--plain")
    args += ["--rerank", params.get("rerank", 0)]
    if "k" in params:
        args += ["-k", params["k"]]
    if "min_score" in params:
        args += ["--min-score", params["min_score"]]
    if "under" in params:
        params["under"] = str(indexed.gallery / params["under"])
        args += ["--under", params["under"]]
    response = client.post("/api/v1/query", params=params, files=upload(photo))
    assert response.status_code == 200, response.text
    answer = response.json()
    cli = json.loads(run_cli(env, *args).stdout)[0]
    assert answer["query"] == "new photo.jpg"
    assert without_ids(answer, "matches") == {**cli, "query": "new photo.jpg"}
    assert answer["matches"], "the test needs matches to compare"
    if "under" in params:
        assert all(m["path"].startswith(params["under"] + "/") for m in answer["matches"])


@pytest.mark.parametrize("plain", [False, True])
def test_query_by_indexed_path_is_the_cli_answer(
    client: httpx.Client, indexed: Indexed, env: Path, plain: bool
) -> None:
    path = indexed.files["astronaut"]
    params = {"k": 3, **({"plain": True} if plain else {})}
    response = client.post("/api/v1/query", params=params, json={"path": str(path)})
    assert response.status_code == 200, response.text
    args = ["query", path, "--index", indexed.index, "-k", 3, "--json"]
    args += ["--rerank", 0]
    cli = json.loads(run_cli(env, *args, *(["--plain"] if plain else [])).stdout)
    assert without_ids(response.json(), "matches") == cli[0]
    # The file does not match itself; its exact copy comes first.
    assert response.json()["matches"][0]["path"] == str(indexed.files["astronaut-copy"])


def test_duplicates_of_upload_is_the_cli_answer(
    client: httpx.Client, indexed: Indexed, env: Path, tmp_path: Path
) -> None:
    # The same bytes as an indexed photo, outside the index: an exact duplicate of both.
    photo = tmp_path / "mine.jpg"
    photo.write_bytes(indexed.files["coffee"].read_bytes())
    response = client.post("/api/v1/duplicates-of", files=upload(photo))
    assert response.status_code == 200, response.text
    answer = response.json()
    cli = run_cli(env, "dupes", "--of", photo, "--index", indexed.index, "--json")
    expected = json.loads(cli.stdout)[0]
    assert without_ids(answer, "duplicates") == {**expected, "query": "mine.jpg"}
    found = {d["path"] for d in answer["duplicates"]}
    assert found == {str(indexed.files["coffee"]), str(indexed.files["coffee-copy"])}


def test_duplicates_come_in_pages(client: httpx.Client, indexed: Indexed) -> None:
    pages = [client.get("/api/v1/duplicates", params={"offset": n, "limit": 1}) for n in (0, 1, 2)]
    assert all(p.status_code == 200 for p in pages)
    first, second, third = (p.json() for p in pages)
    assert first["total"] == second["total"] == 2 and third["groups"] == []
    groups = {
        g["keep"]["path"]: [m["path"] for m in g["members"]]
        for g in first["groups"] + second["groups"]
    }
    f = indexed.files
    assert groups == {
        str(f["astronaut"]): [str(f["astronaut-copy"])],
        str(f["coffee"]): [str(f["coffee-copy"])],
    }
    member = first["groups"][0]["members"][0]
    assert member["tier"] == "exact" and member["exists"] and isinstance(member["id"], int)


def test_info_and_health(client: httpx.Client, indexed: Indexed) -> None:
    health = client.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["images"] == len(indexed.files)
    info = client.get("/api/v1/info").json()
    assert info["images"] == len(indexed.files)
    assert info["folders"] == [str(indexed.gallery)]
    assert client.get("/openapi.json").json()["paths"].keys() >= {
        "/api/v1/query",
        "/api/v1/duplicates",
        "/api/v1/duplicates-of",
        "/api/v1/images/{image_id}/thumbnail",
        "/api/v1/index",
        "/api/v1/actions",
        "/api/v1/undo",
    }


def test_images_are_served_by_catalog_id(client: httpx.Client, indexed: Indexed) -> None:
    answer = client.post("/api/v1/query", json={"path": str(indexed.files["astronaut"])}).json()
    image_id = answer["matches"][0]["id"]
    file = client.get(f"/api/v1/images/{image_id}/file")
    assert file.status_code == 200
    assert file.content == indexed.files["astronaut-copy"].read_bytes()
    assert file.headers["content-type"] == "image/jpeg"
    thumbnail = client.get(f"/api/v1/images/{image_id}/thumbnail", params={"size": 128})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    from PIL import Image

    with Image.open(__import__("io").BytesIO(thumbnail.content)) as image:
        assert max(image.size) == 128
    assert client.get("/api/v1/images/999999/file").status_code == 404
    assert client.get(f"/api/v1/images/{image_id}/thumbnail?size=100000").status_code == 422


# ---------------------------------------------------------------------- safety: paths


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/images/..%2F..%2Fetc%2Fpasswd/file",
        "/api/v1/images/%2Fetc%2Fpasswd/file",
        "/api/v1/images/../../etc/passwd",
        "/api/v1/images/1%2F..%2F2/thumbnail",
        "/api/v1/images/-1/file",
        "/api/v1/images/0/thumbnail",
        "/static/..%2F..%2F..%2Fengine.py",
        "/static/../engine.py",
    ],
)
def test_no_path_from_the_url_is_read(client: httpx.Client, url: str) -> None:
    response = client.get(url)
    assert 400 <= response.status_code < 500, response.text
    assert b"root:" not in response.content and b"QueryEngine" not in response.content


@pytest.mark.parametrize(
    "body",
    [
        {"path": "/etc/passwd"},
        {"path": "astronaut.jpg"},
        {"path": "{gallery}/copies/../astronaut.jpg"},
        {"path": "{gallery}//astronaut.jpg"},
        {"path": "{gallery}/./astronaut.jpg"},
        {"path": "{gallery}/astronaut.jpg\u0000.png"},
        {"path": ""},
        {"path": 7},
        {"nothing": "here"},
    ],
)
def test_query_paths_must_be_indexed_files(
    client: httpx.Client, indexed: Indexed, body: dict[str, Any]
) -> None:
    if isinstance(body.get("path"), str):
        body = {"path": body["path"].replace("{gallery}", str(indexed.gallery))}
    response = client.post("/api/v1/query", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert "matches" not in response.json()


@pytest.mark.parametrize("under", ["/etc", "{gallery}/../", "{gallery}/copies/..", "copies"])
def test_under_must_be_inside_an_indexed_folder(
    client: httpx.Client, indexed: Indexed, under: str
) -> None:
    params = {"under": under.replace("{gallery}", str(indexed.gallery))}
    response = client.post("/api/v1/query", params=params, files=upload(indexed.files["rocket"]))
    assert response.status_code == 400, response.text


def test_symlinks_are_not_served(env: Path, fresh: Indexed) -> None:
    import ghostmatch

    # An indexed file replaced by a symlink to a file outside the gallery.
    secret = fresh.root / "secret.txt"
    secret.write_text("not for the web")
    target = fresh.files["rocket"]
    with ghostmatch.open(fresh.index, create=False) as lib:
        record = lib.catalog.records_by_path([target])[target]
    target.unlink()
    target.symlink_to(secret)
    with serving(fresh.index) as running, running.client() as c:
        for url in (f"/api/v1/images/{record.id}/file", f"/api/v1/images/{record.id}/thumbnail"):
            response = c.get(url)
            assert response.status_code == 403 and b"not for the web" not in response.content
        assert c.post("/api/v1/query", json={"path": str(target)}).status_code == 403


# ---------------------------------------------------------------------- safety: uploads


@pytest.fixture(scope="module")
def strict(indexed: Indexed) -> Iterator[Server]:
    """Limits small enough to hit: 300 kB uploads, 0.2 megapixels."""
    with serving(indexed.index, max_upload_bytes=300_000, max_megapixels=0.2) as running:
        yield running


@pytest.mark.parametrize(
    ("files", "status", "says"),
    [
        ({"image": ("a.jpg", b"this is text", "image/jpeg")}, 422, "not-an-image"),
        ({"image": ("a.jpg", b"", "image/jpeg")}, 422, "empty"),
        ({"image": ("a.jpg", jpeg("chelsea")[:3000], "image/jpeg")}, 422, "truncated"),
        ({"image": ("a.png", png_with_header_size(100_000, 100_000), "image/png")}, 413, "bomb"),
        ({"image": ("a.jpg", jpeg("astronaut"), "image/jpeg")}, 413, "0.2"),  # 512x512
        ({"image": ("a.jpg", os.urandom(400_000), "image/jpeg")}, 413, "0.3 MB"),
        ({"picture": ("a.jpg", jpeg("rocket", (64, 64)), "image/jpeg")}, 422, "'image'"),
    ],
)
@pytest.mark.parametrize("route", ["/api/v1/query", "/api/v1/duplicates-of"])
def test_bad_uploads_get_a_4xx_with_the_reason(
    strict: Server, route: str, files: dict[str, Any], status: int, says: str
) -> None:
    with strict.client() as c:
        response = c.post(route, files=files)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]


def test_an_oversized_upload_without_a_length_is_cut_off(strict: Server) -> None:
    def body() -> Iterator[bytes]:
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        for _ in range(32):  # 2 MB, no Content-Length: chunked
            yield b"x" * 65536

    with strict.client() as c:
        response = c.post(
            "/api/v1/query",
            content=body(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
    assert response.status_code == 413, response.text


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"not json", {"Content-Type": "application/json"}, 422),
        (b"--x\r\nnonsense", {"Content-Type": "multipart/form-data; boundary=x"}, 422),
        (b"image=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        (b"abc", {"Content-Type": "text/plain"}, 415),
    ],
)
def test_malformed_bodies_get_a_4xx(
    client: httpx.Client, content: bytes, headers: dict[str, str], status: int
) -> None:
    response = client.post("/api/v1/query", content=content, headers=headers)
    assert response.status_code == status, response.text


# ---------------------------------------------------------------------- safety: token, CSRF


@pytest.fixture(scope="module")
def guarded(indexed: Indexed) -> Iterator[Server]:
    with serving(indexed.index, token=TOKEN) as running:
        yield running


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/"),
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/info"),
        ("GET", "/api/v1/duplicates"),
        ("GET", "/api/v1/images/1/file"),
        ("GET", "/api/v1/images/1/thumbnail"),
        ("POST", "/api/v1/query"),
        ("POST", "/api/v1/index"),
        ("POST", "/api/v1/undo"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-wrong-token", "Basic " + TOKEN])
def test_every_request_needs_the_token(
    guarded: Server, method: str, url: str, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    with guarded.client() as c:
        response = c.request(method, url, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_token_opens_the_api_and_the_page(guarded: Server) -> None:
    with guarded.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/api/v1/health").status_code == 200
        assert c.get("/api/v1/images/1/thumbnail").status_code == 200
    # A browser opens /?token=... once; the token moves to a same-site-only cookie.
    with guarded.client() as browser:
        first = browser.get("/", params={"token": TOKEN})
        assert first.status_code == 303 and first.headers["location"] == "/"
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/").status_code == 200
        assert browser.get("/api/v1/images/1/thumbnail").status_code == 200
    with guarded.client() as stranger:
        assert stranger.get("/", params={"token": "wrong"}).status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "text/plain"},
    ],
)
@pytest.mark.parametrize("route", ["/api/v1/actions", "/api/v1/undo", "/api/v1/index"])
def test_actions_are_refused_from_another_origin(
    guarded: Server, route: str, headers: dict[str, str]
) -> None:
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **headers}
    body = json.dumps({"op": "delete", "groups": [{"keep": 1, "copies": [2]}]})
    with guarded.client() as c:
        response = c.post(route, content=body, headers=sent)
    assert response.status_code in (403, 415), response.text
    assert guarded.engine._jobs == {}  # no index run was started


def test_a_foreign_host_name_is_refused(client: httpx.Client, server: Server) -> None:
    # A page that points its own name at 127.0.0.1 (DNS rebinding) gets nothing.
    response = client.get("/api/v1/health", headers={"Host": f"evil.example:{server.port}"})
    assert response.status_code == 421


def test_binding_beyond_this_machine_needs_a_token(env: Path, indexed: Indexed) -> None:
    for extra in ([], ["--token", "short"]):
        result = run_cli(
            env, "serve", "--index", indexed.index, "--host", "0.0.0.0", "--port", 0, *extra
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "--token" in result.stderr


def test_the_command_serves_until_ctrl_c(env: Path, indexed: Indexed) -> None:
    proc = subprocess.Popen(
        [*CLI, "serve", "--index", os.fspath(indexed.index), "--port", "0"],
        env=cli_env(env),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once the model and index are loaded
        assert "serving" in line, line
        url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{url}/api/v1/health", timeout=60).json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "stopped" in rest
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- load


def test_concurrent_uploads_share_a_batch_and_a_full_queue_gets_503(indexed: Indexed) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold(size: int) -> None:
        entered.set()
        release.wait(timeout=120)

    photo = upload(indexed.files["chelsea"])
    with serving(indexed.index, queue=5, max_batch=8) as running:
        running.engine.before_embed = hold
        with ThreadPoolExecutor(5) as pool, running.client() as c:
            first = pool.submit(c.post, "/api/v1/query", files=photo)
            assert entered.wait(timeout=120)  # the model is held with one upload in it
            rest = [pool.submit(c.post, "/api/v1/query", files=photo) for _ in range(4)]
            deadline = time.monotonic() + 120
            while running.engine.batcher.pending < 4:  # all four wait for the model
                assert time.monotonic() < deadline
                time.sleep(0.01)
            full = c.post("/api/v1/query", files=photo)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            running.engine.before_embed = None
            release.set()
            answers = [f.result() for f in [first, *rest]]
        assert [a.status_code for a in answers] == [200] * 5
        assert len({json.dumps(a.json()) for a in answers}) == 1
        # The four that waited went through the model together.
        assert running.engine.batcher.batch_sizes[:2] == [1, 4]


def test_an_index_job_runs_while_queries_are_answered(env: Path, fresh: Indexed) -> None:
    new = fresh.gallery / "new" / "hubble.jpg"
    new.parent.mkdir()
    new.write_bytes(jpeg("hubble_deep_field"))
    entered, release = threading.Event(), threading.Event()

    def hold(job: Any) -> None:
        entered.set()
        release.wait(timeout=120)

    with serving(fresh.index) as running, running.client() as c:
        running.engine.job_progress = hold
        started = c.post("/api/v1/index", json={})
        assert started.status_code == 202, started.text
        job = started.json()["id"]
        assert entered.wait(timeout=120)  # the job is indexing the new photo
        assert c.get(f"/api/v1/jobs/{job}").json()["state"] == "running"
        assert c.post("/api/v1/index", json={}).status_code == 409
        during = c.post("/api/v1/query", params={"k": 1}, files=upload(new))
        assert during.status_code == 200
        assert during.json()["matches"][0]["path"] != str(new)
        release.set()
        deadline = time.monotonic() + 120
        while (state := c.get(f"/api/v1/jobs/{job}").json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state["state"] == "done" and state["report"]["added"] == 1, state
        # The server picks up the index the job wrote, without a restart.
        after = c.post("/api/v1/query", params={"k": 1}, files=upload(new))
        assert after.json()["matches"][0]["path"] == str(new)
        assert c.get("/api/v1/jobs/nope").status_code == 404


def test_queries_are_answered_while_another_process_holds_the_write_lock(
    server: Server, indexed: Indexed
) -> None:
    import sqlite3

    # Another writer (an index run committing) holds the catalog's write lock and has
    # changed rows it has not committed: readers see the last commit and do not wait.
    writer = sqlite3.connect(indexed.index / "catalog.db", isolation_level=None, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE images SET width = width + 1")
        with server.client(timeout=20) as c:
            health = c.get("/api/v1/health")
            answer = c.post("/api/v1/query", files=upload(indexed.files["rocket"]))
            by_path = c.post("/api/v1/query", json={"path": str(indexed.files["rocket"])})
        assert health.status_code == answer.status_code == by_path.status_code == 200
        assert answer.json()["matches"][0]["width"] == 640  # the committed value
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_an_index_changed_by_another_process_is_picked_up(env: Path, fresh: Indexed) -> None:
    new = fresh.gallery / "hubble.jpg"
    with serving(fresh.index) as running, running.client() as c:
        before = c.get("/api/v1/health").json()
        new.write_bytes(jpeg("hubble_deep_field"))
        result = run_cli(env, "index", fresh.gallery, "--index", fresh.index, "--quiet")
        assert result.returncode == 0, result.stderr
        after = c.get("/api/v1/health").json()
        assert after["images"] == before["images"] + 1
        assert after["generation"] != before["generation"]
        answer = c.post(
            "/api/v1/query", json={"path": str(fresh.files["rocket"])}, params={"k": 20}
        )
        assert str(new) in {m["path"] for m in answer.json()["matches"]}


# ---------------------------------------------------------------------- actions


def groups_by_keep(c: httpx.Client) -> dict[str, dict[str, Any]]:
    page = c.get("/api/v1/duplicates").json()
    return {g["keep"]["path"]: g for g in page["groups"]}


def test_trash_the_copies_then_undo(fresh: Indexed) -> None:
    f = fresh.files
    copy_bytes = f["astronaut-copy"].read_bytes()
    with serving(fresh.index) as running, running.client() as c:
        group = groups_by_keep(c)[str(f["astronaut"])]
        choice = {"keep": group["keep"]["id"], "copies": [m["id"] for m in group["members"]]}
        dry = c.post("/api/v1/actions", json={"op": "delete", "groups": [choice], "dry_run": True})
        assert dry.status_code == 200 and dry.json()["journal"] is None
        assert f["astronaut-copy"].exists()
        done = c.post("/api/v1/actions", json={"op": "delete", "groups": [choice]})
        assert done.status_code == 200, done.text
        report = done.json()
        assert [a["source"] for a in report["done"]] == [str(f["astronaut-copy"])]
        assert not f["astronaut-copy"].exists() and f["astronaut"].exists()
        journal = fresh.index / "serve-journals" / report["journal"]
        assert journal.is_file()  # journaled exactly like dupes --apply
        trashed = groups_by_keep(c)[str(f["astronaut"])]["members"][0]
        assert trashed["exists"] is False
        undone = c.post("/api/v1/undo", json={"journal": report["journal"]})
        assert undone.status_code == 200, undone.text
        assert undone.json()["restored"] == [str(f["astronaut-copy"])]
        assert f["astronaut-copy"].read_bytes() == copy_bytes
        again = c.post("/api/v1/undo", json={"journal": report["journal"]}).json()
        assert again["restored"] == [] and again["already_undone"] == 1


def test_keep_another_file_instead(fresh: Indexed) -> None:
    f = fresh.files
    with serving(fresh.index) as running, running.client() as c:
        group = groups_by_keep(c)[str(f["coffee"])]
        copy_id = group["members"][0]["id"]
        choice = {"keep": copy_id, "copies": [group["keep"]["id"]]}
        done = c.post("/api/v1/actions", json={"op": "delete", "groups": [choice]}).json()
        assert not f["coffee"].exists() and f["coffee-copy"].exists()
        c.post("/api/v1/undo", json={"journal": done["journal"]})
        assert f["coffee"].exists()


def test_not_a_duplicate_is_stored(env: Path, fresh: Indexed) -> None:
    f = fresh.files
    with serving(fresh.index) as running, running.client() as c:
        group = groups_by_keep(c)[str(f["coffee"])]
        pair = {"a": group["keep"]["id"], "b": group["members"][0]["id"]}
        assert c.post("/api/v1/not-duplicate", json=pair).status_code == 200
        assert str(f["coffee"]) not in groups_by_keep(c)
    # Stored like --not-dup: the CLI no longer groups them either.
    cli = run_cli(env, "dupes", "--index", fresh.index, "--json")
    keeps = {g["keep"] for g in json.loads(cli.stdout)["groups"]}
    assert keeps == {str(f["astronaut"])}


@pytest.mark.parametrize(
    ("choice", "status"),
    [
        ({"op": "delete", "keep": "astronaut", "copies": ["rocket"]}, 409),  # not one group
        ({"op": "delete", "keep": "astronaut", "copies": ["astronaut"]}, 422),
        ({"op": "delete", "keep": "astronaut", "copies": []}, 422),
        ({"op": "move", "keep": "astronaut", "copies": ["astronaut-copy"]}, 400),  # no --move-to
        ({"op": "unlink", "keep": "astronaut", "copies": ["astronaut-copy"]}, 422),
    ],
)
def test_actions_act_only_on_listed_groups(
    client: httpx.Client, indexed: Indexed, choice: dict[str, Any], status: int
) -> None:
    client.get("/api/v1/duplicates")
    ids = {
        name: client.post("/api/v1/query", json={"path": str(path)}).json()["matches"]
        for name, path in indexed.files.items()
    }
    # Every file's id, from the matches of some other file.
    known = {m["path"]: m["id"] for matches in ids.values() for m in matches}
    group = {
        "keep": known[str(indexed.files[choice["keep"]])],
        "copies": [known[str(indexed.files[n])] for n in choice["copies"]],
    }
    response = client.post("/api/v1/actions", json={"op": choice["op"], "groups": [group]})
    assert response.status_code == status, response.text
    assert all(path.exists() for path in indexed.files.values())


@pytest.mark.parametrize(
    "journal", ["../catalog.db", "/etc/passwd", "20260101-000000-000000000000.jsonl", "x"]
)
def test_undo_takes_only_journals_of_this_server(client: httpx.Client, journal: str) -> None:
    response = client.post("/api/v1/undo", json={"journal": journal})
    assert response.status_code in (404, 422), response.text


def test_page_escapes_file_names(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script and "textContent" in script
    assert XSS_NAME not in page.text


# ---------------------------------------------------------------------- the batcher


def test_a_lone_request_does_not_wait_for_a_batch() -> None:
    from ghostmatch.serve.batching import MicroBatcher

    # A wait of an hour: the answer can only come back if nobody expected makes it wait.
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x * 2 for x in xs], 16, 3600.0)
    try:
        with batcher.expecting():
            future = batcher.submit(21)
        assert future.result(timeout=60) == 42
        assert batcher.batch_sizes == [1]
    finally:
        batcher.close()


def test_a_batch_waits_for_requests_still_preparing() -> None:
    from ghostmatch.serve.batching import MicroBatcher

    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x + 1 for x in xs], 16, 3600.0)
    try:
        with batcher.expecting():  # a second request is still decoding its image
            with batcher.expecting():
                first = batcher.submit(1)
            assert not first.done()
            second = batcher.submit(2)
        assert (first.result(timeout=60), second.result(timeout=60)) == (2, 3)
        assert batcher.batch_sizes == [2]
    finally:
        batcher.close()


def test_a_failed_batch_fails_its_requests_only() -> None:
    from ghostmatch.serve.batching import MicroBatcher

    def run(xs: list[int]) -> list[int]:
        if 0 in xs:
            raise ValueError("bad item")
        return xs

    batcher: MicroBatcher[int, int] = MicroBatcher(run, 16, 0.0)
    try:
        with pytest.raises(ValueError, match="bad item"):
            batcher.submit(0).result(timeout=60)
        assert batcher.submit(5).result(timeout=60) == 5
    finally:
        batcher.close()


# ---------------------------------------------------------------------- more routes


def test_similar_files_are_listed_apart_only_when_asked(client: httpx.Client) -> None:
    default = client.get("/api/v1/duplicates").json()
    listed = client.get("/api/v1/duplicates", params={"similar": True}).json()
    assert all("similar" not in group for group in default["groups"])
    assert all(isinstance(group["similar"], list) for group in listed["groups"])
    # The same duplicates either way: similar files are never members.
    assert [g["members"] for g in listed["groups"] if g["members"]] == [
        g["members"] for g in default["groups"]
    ]


def test_duplicates_take_a_threshold_and_the_geometric_check(client: httpx.Client) -> None:
    default = client.get("/api/v1/duplicates").json()
    strict = client.get("/api/v1/duplicates", params={"threshold": 0.99, "verify": False}).json()
    assert strict["threshold"] == 0.99 and default["threshold"] != 0.99
    # Exact copies are grouped whatever the threshold.
    assert strict["total"] == default["total"] == 2
    for bad in ({"threshold": 5}, {"limit": 0}, {"offset": -1}, {"limit": 100_000}):
        assert client.get("/api/v1/duplicates", params=bad).status_code == 422


def test_move_the_copies_into_the_servers_folder_then_undo(fresh: Indexed) -> None:
    f = fresh.files
    dupes = fresh.root / "dupes"
    with serving(fresh.index, move_to=dupes) as running, running.client() as c:
        group = groups_by_keep(c)[str(f["astronaut"])]
        choice = {"keep": group["keep"]["id"], "copies": [m["id"] for m in group["members"]]}
        done = c.post("/api/v1/actions", json={"op": "move", "groups": [choice]}).json()
        moved = [Path(a["target"]) for a in done["done"]]
        assert len(moved) == 1 and moved[0].is_relative_to(dupes) and moved[0].is_file()
        assert not f["astronaut-copy"].exists()
        c.post("/api/v1/undo", json={"journal": done["journal"]})
        assert f["astronaut-copy"].exists() and not moved[0].exists()


def test_a_taken_port_is_a_one_line_error(env: Path, indexed: Indexed, server: Server) -> None:
    result = run_cli(env, "serve", "--index", indexed.index, "--port", server.port)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_docs_page_uses_no_other_site(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    for asset in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
        assert client.get(asset).status_code == 200


def test_a_file_name_that_is_not_utf8_round_trips(env: Path, fresh: Indexed) -> None:
    import ghostmatch

    name = os.fsdecode(b"caf\xe9.jpg")
    odd = fresh.gallery / name
    odd.write_bytes(fresh.files["chelsea"].read_bytes())
    with ghostmatch.open(fresh.index) as lib:
        lib.index([fresh.gallery])
    with serving(fresh.index) as running, running.client() as c:
        response = c.post("/api/v1/query", json={"path": str(fresh.files["chelsea"])})
        assert response.status_code == 200, response.text
        assert b"caf\\udce9.jpg" in response.content  # as --json writes it
        first = response.json()["matches"][0]
        assert os.fsencode(first["path"]) == os.fsencode(odd)
        # The path comes back as a query that names the file exactly (sent with the same
        # \udcNN escape: a strict UTF-8 encoder cannot write it raw).
        body = json.dumps({"path": first["path"]})
        again = c.post("/api/v1/query", content=body, headers={"Content-Type": "application/json"})
        assert again.status_code == 200 and again.json()["query"] == first["path"]
        assert c.get(f"/api/v1/images/{first['id']}/file").content == odd.read_bytes()
