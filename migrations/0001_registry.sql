-- cdc-egress registry, version 1: file log, per-table state, reload operations, DDL history.
-- `{{schema}}` is replaced by the quoted registry schema. Applied once, inside one transaction.

CREATE TABLE {{schema}}.files (
    id                  bigserial PRIMARY KEY,
    batch_id            text        NOT NULL UNIQUE,
    table_schema        text        NOT NULL,
    table_name          text        NOT NULL,
    kind                text        NOT NULL CHECK (kind IN ('streaming', 'reload', 'ddl')),
    object_path         text        NOT NULL,
    schema_path         text,
    manifest_path       text,
    first_commit_lsn    pg_lsn,
    first_seq           integer,
    last_commit_lsn     pg_lsn,
    last_seq            integer,
    first_commit_ts     timestamptz,
    last_commit_ts      timestamptz,
    row_count           bigint      NOT NULL,
    byte_size           bigint      NOT NULL,
    csv_bytes           bigint      NOT NULL,
    checksum            text        NOT NULL,
    schema_version      integer     NOT NULL,
    schema_fingerprint  text        NOT NULL,
    reload_id           bigint,
    part                integer,
    ops                 jsonb,
    notified_stream_seq bigint,
    notified_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_table_idx ON {{schema}}.files (table_schema, table_name, id);
CREATE INDEX files_unnotified_idx ON {{schema}}.files (id) WHERE notified_stream_seq IS NULL;

CREATE TABLE {{schema}}.tables (
    table_schema        text        NOT NULL,
    table_name          text        NOT NULL,
    mode                text        NOT NULL DEFAULT 'streaming' CHECK (mode IN ('streaming', 'reloading')),
    last_commit_lsn     pg_lsn,
    last_seq            integer,
    last_file_id        bigint,
    schema_version      integer     NOT NULL DEFAULT 0,
    schema_fingerprint  text,
    columns             jsonb,
    rows_total          bigint      NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);

CREATE TABLE {{schema}}.reloads (
    id              bigserial   PRIMARY KEY,
    table_schema    text        NOT NULL,
    table_name      text        NOT NULL,
    status          text        NOT NULL DEFAULT 'requested'
                    CHECK (status IN ('requested', 'running', 'done', 'failed', 'cancelled')),
    reason          text,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    requested_lsn   pg_lsn,
    started_at      timestamptz,
    finished_at     timestamptz,
    cut_lsn         pg_lsn,
    snapshot        text,
    rows            bigint,
    bytes           bigint,
    parts           integer,
    estimate_rows   bigint,
    estimate_bytes  bigint,
    error           text
);
CREATE UNIQUE INDEX reloads_one_active_idx ON {{schema}}.reloads (table_schema, table_name)
    WHERE status IN ('requested', 'running');

CREATE TABLE {{schema}}.ddl_history (
    id              bigserial   PRIMARY KEY,
    commit_lsn      pg_lsn,
    table_schema    text,
    table_name      text,
    command_tag     text        NOT NULL,
    object_identity text,
    command         text,
    schema_version  integer,
    captured_at     timestamptz NOT NULL DEFAULT now()
);

-- One row, updated by the daemon: what `status` shows about the process itself.
CREATE TABLE {{schema}}.daemon (
    slot_name       text        PRIMARY KEY,
    confirmed_lsn   pg_lsn,
    received_lsn    pg_lsn,
    state           text        NOT NULL,
    last_error      text,
    pid             integer,
    host            text,
    heartbeat_at    timestamptz NOT NULL DEFAULT now()
);
