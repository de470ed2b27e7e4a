"""CQL tokenizer/classifier tables and cassandra rule compilation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import ParserConfigError, RuleError
from proxyd.parsers.cassandra import CassandraFactory
from proxyd.parsers.cassandra.cql import ACTIONS, Name, TokenizeError, classify, tokenize
from proxyd.parsers.cassandra.rules import CassandraRequest


def _one(q: str) -> tuple[str, str | None]:
    sts = classify(q)
    assert len(sts) == 1, sts
    s = sts[0]
    if s.target is None:
        return s.action, None
    return s.action, (f"{s.target.keyspace}.{s.target.name}" if s.target.keyspace else s.target.name)


CASES = [
    ("SELECT * FROM ks.users", "select", "ks.users"),
    ("select * from users where id = 1", "select", "users"),
    ("SELECT JSON id FROM ks.t", "select", "ks.t"),
    ('SELECT DISTINCT k FROM "Ks"."My Table"', "select", "Ks.My Table"),
    ("SELECT \"from\", cast(x AS text) FROM ks.t WHERE a = 'from evil.t'", "select", "ks.t"),
    ("SELECT count(*) FROM ks.t;", "select", "ks.t"),
    ("SELECT * FROM system.local WHERE key='local'", "select", "system.local"),
    ("  /* FROM evil.t */ SELECT a FROM ks.t -- FROM evil.x", "select", "ks.t"),
    ("// comment FROM evil.x\nSELECT a FROM ks.t", "select", "ks.t"),
    ("SELECT a FROM ks . t", "select", "ks.t"),
    ("SELECT a FROM KS.T", "select", "ks.t"),
    ("SELECT a FROM ks.t WHERE b = $$it's FROM x.y$$", "select", "ks.t"),
    ("INSERT INTO ks.users (id, name) VALUES (1, 'a')", "insert", "ks.users"),
    ("insert into users JSON '{\"id\": 1}'", "insert", "users"),
    ("INSERT INTO ks.t (a) VALUES (1) IF NOT EXISTS USING TTL 5", "insert", "ks.t"),
    ("UPDATE ks.t USING TTL 10 SET a = 1 WHERE k = 2", "update", "ks.t"),
    ("UPDATE t SET a = 'x' WHERE k = 2 IF EXISTS", "update", "t"),
    ("DELETE FROM ks.t WHERE k = 1", "delete", "ks.t"),
    ("DELETE a, m['from'] FROM ks.t USING TIMESTAMP 5 WHERE k = 1", "delete", "ks.t"),
    ("USE ks", "use", "ks"),
    ('use "MyKs";', "use", "MyKs"),
    ("TRUNCATE ks.t", "truncate-table", "ks.t"),
    ("TRUNCATE TABLE ks.t", "truncate-table", "ks.t"),
    ("TRUNCATE COLUMNFAMILY t", "truncate-table", "t"),
    ("CREATE TABLE ks.t (a int PRIMARY KEY)", "create-table", "ks.t"),
    ("CREATE TABLE IF NOT EXISTS ks.t (a int PRIMARY KEY)", "create-table", "ks.t"),
    ("CREATE COLUMNFAMILY t (a int PRIMARY KEY)", "create-table", "t"),
    ("ALTER TABLE ks.t ADD b text", "alter-table", "ks.t"),
    ("DROP TABLE ks.t", "drop-table", "ks.t"),
    ("DROP TABLE IF EXISTS ks.t", "drop-table", "ks.t"),
    ("CREATE KEYSPACE ks WITH replication = {'class': 'SimpleStrategy'}", "create-keyspace", "ks"),
    ("CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {}", "create-keyspace", "ks"),
    ("CREATE SCHEMA ks WITH replication = {}", "create-keyspace", "ks"),
    ("ALTER KEYSPACE ks WITH durable_writes = false", "alter-keyspace", "ks"),
    ("DROP KEYSPACE IF EXISTS ks", "drop-keyspace", "ks"),
    ("CREATE INDEX ON ks.t (b)", "create-index", "ks.t"),
    ("CREATE INDEX IF NOT EXISTS idx ON ks.t (b)", "create-index", "ks.t"),
    ("CREATE CUSTOM INDEX idx ON t (b) USING 'StorageAttachedIndex'", "create-index", "t"),
    ("DROP INDEX ks.idx", "drop-index", "ks.idx"),
    ("DROP INDEX IF EXISTS idx", "drop-index", "idx"),
    (
        "CREATE MATERIALIZED VIEW ks.v AS SELECT * FROM ks.t WHERE a IS NOT NULL PRIMARY KEY (a)",
        "create-materialized-view",
        "ks.v",
    ),
    ("CREATE MATERIALIZED VIEW IF NOT EXISTS v AS SELECT a FROM t", "create-materialized-view", "v"),
    ("ALTER MATERIALIZED VIEW ks.v WITH comment = 'x'", "alter-materialized-view", "ks.v"),
    ("DROP MATERIALIZED VIEW IF EXISTS ks.v", "drop-materialized-view", "ks.v"),
    ("CREATE ROLE alice WITH PASSWORD = 'x' AND LOGIN = true", "create-role", None),
    ('CREATE ROLE IF NOT EXISTS "Bob"', "create-role", None),
    ("ALTER ROLE alice WITH SUPERUSER = true", "alter-role", None),
    ("DROP ROLE IF EXISTS alice", "drop-role", None),
    ("GRANT admin TO alice", "grant-role", None),
    ("REVOKE admin FROM alice", "revoke-role", None),
    ("GRANT SELECT ON KEYSPACE ks TO alice", "grant-permission", None),
    ("GRANT ALL PERMISSIONS ON ALL KEYSPACES TO alice", "grant-permission", None),
    ("REVOKE MODIFY ON TABLE ks.t FROM alice", "revoke-permission", None),
    ("LIST ROLES", "list-roles", None),
    ("LIST ROLES OF alice NORECURSIVE", "list-roles", None),
    ("LIST ALL PERMISSIONS OF alice", "list-permissions", None),
    ("LIST SELECT ON ks.t", "list-permissions", None),
    ("LIST USERS", "list-users", None),
    ("CREATE USER bob WITH PASSWORD 'x' SUPERUSER", "create-user", None),
    ("ALTER USER bob WITH PASSWORD 'y'", "alter-user", None),
    ("DROP USER IF EXISTS bob", "drop-user", None),
    (
        "CREATE FUNCTION ks.f (a int) RETURNS NULL ON NULL INPUT RETURNS int LANGUAGE java "
        "AS $$ return a; $$",
        "create-function",
        "ks.f",
    ),
    (
        "CREATE OR REPLACE FUNCTION f (a int) CALLED ON NULL INPUT RETURNS int LANGUAGE java AS 'return a;'",
        "create-function",
        "f",
    ),
    ("DROP FUNCTION IF EXISTS ks.f", "drop-function", "ks.f"),
    ("CREATE AGGREGATE IF NOT EXISTS ks.agg (int) SFUNC f STYPE int", "create-aggregate", "ks.agg"),
    ("DROP AGGREGATE ks.agg", "drop-aggregate", "ks.agg"),
    ("CREATE TYPE ks.addr (street text)", "create-type", "ks.addr"),
    ("ALTER TYPE ks.addr ADD zip int", "alter-type", "ks.addr"),
    ("DROP TYPE IF EXISTS addr", "drop-type", "addr"),
    ("CREATE TRIGGER trg ON ks.t USING 'org.Trigger'", "create-trigger", "ks.t"),
    ("CREATE TRIGGER IF NOT EXISTS trg ON t USING 'x'", "create-trigger", "t"),
    ("DROP TRIGGER trg ON ks.t", "drop-trigger", "ks.t"),
    # Not understood, so only an allow-all rule passes them.
    ("SELECT * FROM ks.t; DROP TABLE ks.secret", "invalid", None),
    ("SELECT * FROM 'ks.t'", "invalid", None),
    ("SELECT a FROM ks.t WHERE b = 'unterminated", "invalid", None),
    ("SELECT 1", "invalid", None),
    ("/* unterminated", "invalid", None),
    ("", "invalid", None),
    ("EXPLODE ks.t", "invalid", None),
    ("CREATE WIDGET w", "invalid", None),
]


@pytest.mark.parametrize(("query", "action", "target"), CASES)
def test_classify(query: str, action: str, target: str | None) -> None:
    assert _one(query) == (action, target)


def test_every_action_known_to_rules() -> None:
    produced = {a for _, a, _ in CASES} - {"invalid"}
    assert produced <= set(ACTIONS)


def test_cql_batch_members() -> None:
    q = """BEGIN BATCH USING TIMESTAMP 5
             INSERT INTO ks.a (k) VALUES (1);
             UPDATE ks.b SET v = 'update' WHERE k = 1
             DELETE FROM c WHERE k = (1);
           APPLY BATCH;"""
    sts = classify(q)
    assert [(s.action, s.target) for s in sts] == [
        ("insert", Name("ks", "a")),
        ("update", Name("ks", "b")),
        ("delete", Name(None, "c")),
    ]
    assert classify("BEGIN UNLOGGED BATCH INSERT INTO a (k) VALUES (1) APPLY BATCH")[0].action == "insert"
    assert (
        classify("BEGIN COUNTER BATCH UPDATE a SET c = c + 1 WHERE k = 1 APPLY BATCH")[0].action == "update"
    )
    for bad in (
        "BEGIN BATCH INSERT INTO a (k) VALUES (1)",  # no APPLY BATCH
        "BEGIN BATCH APPLY BATCH",
        "BEGIN BATCH SELECT * FROM a APPLY BATCH",
        "BEGIN BATCH INSERT INTO a (k) VALUES (1) APPLY BATCH; DROP TABLE x",
    ):
        assert [s.action for s in classify(bad)] == ["invalid"], bad


def test_tokenizer() -> None:
    toks = tokenize("SELECT 'it''s', \"Q\"\"x\" FROM t -- c\n/* d */ $$a$$")
    assert [(t.kind, t.text) for t in toks] == [
        ("w", "select"),
        ("s", "it's"),
        ("p", ","),
        ("q", 'Q"x'),
        ("w", "from"),
        ("w", "t"),
        ("s", "a"),
    ]
    with pytest.raises(TokenizeError):
        tokenize('SELECT "unterminated')
    with pytest.raises(TokenizeError):
        tokenize("$$ unterminated")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_classify_never_raises(text: str) -> None:
    for s in classify(text):
        assert s.action == "invalid" or s.action in ACTIONS


# --- rules ------------------------------------------------------------------------------------

F = CassandraFactory()


@pytest.mark.parametrize(
    ("rule", "request_", "ok"),
    [
        ({}, CassandraRequest("select", "ks.t"), True),
        ({"query_action": "select"}, CassandraRequest("select", "ks.t"), True),
        ({"query_action": "select"}, CassandraRequest("insert", "ks.t"), False),
        ({"query_table": "^ks\\."}, CassandraRequest("insert", "ks.t"), True),
        ({"query_table": "^ks\\."}, CassandraRequest("insert", "other.t"), False),
        ({"query_table": "users"}, CassandraRequest("select", "ks.users"), True),  # searched
        (
            {"query_action": "select", "query_table": "^system\\."},
            CassandraRequest("select", "system.local"),
            True,
        ),
        ({"query_table": "^ks\\."}, CassandraRequest("create-role", ""), False),  # fail closed
        ({"query_action": "create-role"}, CassandraRequest("create-role", ""), True),
        ({"query_table": ""}, CassandraRequest("drop-role", ""), True),  # empty regex = absent
        ({}, "not a request", False),
        ({"query_action": "select"}, "not a request", False),
    ],
)
def test_rule_matches(rule: dict[str, str], request_: object, ok: bool) -> None:
    assert F.compile_rule(rule).matches(request_) is ok


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"query_action": "SELECT"}, "query_action"),
        ({"query_action": "explode"}, "query_action"),
        ({"query_table": "("}, "query_table"),
        ({"query_table": "[a-"}, "query_table"),
        ({"table": "x"}, "table"),
        ({"query_action": "select", "cmd": "x"}, "cmd"),
        ({"query_action": "create-role", "query_table": "x"}, "query_table"),
        ({"query_action": "grant-permission", "query_table": "x"}, "query_table"),
    ],
)
def test_rule_rejected(rule: dict[str, str], key: str) -> None:
    with pytest.raises(RuleError) as err:
        F.compile_rule(rule)
    assert err.value.key == key


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_action_compiles(action: str) -> None:
    F.compile_rule({"query_action": action})


def test_config() -> None:
    cfg = F.validate_config({"max_frame_bytes": 1024, "enforce_use": True, "max_prepared": 5})
    assert cfg.max_frame_bytes == 1024
    assert cfg.enforce_use
    assert F.validate_config({}).max_frame_bytes == 256 << 20
    for bad, key in (
        ({"bogus": 1}, "bogus"),
        ({"max_frame_bytes": "big"}, "max_frame_bytes"),
        ({"max_frame_bytes": True}, "max_frame_bytes"),
        ({"max_frame_bytes": 0}, "max_frame_bytes"),
        ({"max_frame_bytes": 1 << 40}, "max_frame_bytes"),
        ({"enforce_use": "yes"}, "enforce_use"),
    ):
        with pytest.raises(ParserConfigError) as err:
            F.validate_config(bad)
        assert err.value.key == key
