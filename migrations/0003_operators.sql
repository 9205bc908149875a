-- cdc-egress registry, version 3: the registry's own identity, and reload requests that no daemon
-- has read yet.

-- One row. `incarnation` is new for every registry created (a dropped and recreated registry or
-- database gets another), and prefixes every JetStream `Nats-Msg-Id`, so a stream that outlives its
-- registry never mistakes a new notice for an old one.
CREATE TABLE {{schema}}.registry_info (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    incarnation text        NOT NULL DEFAULT substr(replace(gen_random_uuid()::text, '-', ''), 1, 12),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {{schema}}.registry_info DEFAULT VALUES;

-- Written by `cdc-egress reload` next to the marker it places in the WAL, so `status` and
-- `reload --wait` can say that a request is waiting for a daemon to read it. `wal_lsn` is the source's
-- WAL position right after the marker committed: the marker lies below it. The daemon sets
-- `reload_id` and `read_at` when it reads the marker (the reload may be one already running for the
-- table, which the request joins).
CREATE TABLE {{schema}}.reload_requests (
    request       text        PRIMARY KEY,
    table_schema  text        NOT NULL,
    table_name    text        NOT NULL,
    wal_lsn       pg_lsn,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    reload_id     bigint,
    read_at       timestamptz
);

-- The life of each replication slot as the daemons saw it: `created` (by a daemon, at its
-- consistent point), `dropped` (by `cdc-egress drop-slot`), `lost` (found invalidated or missing
-- after it had been created: the changes from `lsn`, its last confirmed position, up to the next
-- `created` are not in any streaming file, and every table was re-exported). A `lost` event is
-- announced on NATS; `notified_stream_seq` records that it was.
CREATE TABLE {{schema}}.slot_events (
    id                  bigserial   PRIMARY KEY,
    slot_name           text        NOT NULL,
    event               text        NOT NULL CHECK (event IN ('created', 'dropped', 'lost')),
    lsn                 pg_lsn,
    detail              text,
    notified_stream_seq bigint,
    at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX slot_events_slot_idx ON {{schema}}.slot_events (slot_name, id);
