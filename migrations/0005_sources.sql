-- cdc-egress registry, version 5: several sources share one registry (README "Running several daemons").
--
-- A source is one slot of one source database, under a name (`source.name`, by default the slot's
-- name). Every row below belongs to one source, and a daemon reads and writes only its own: recovery,
-- reload requests, status rows and slot events of one source never touch another's. `sources` records
-- which slot of which database owns each name; a daemon of another slot or database using a name that
-- is taken is refused before it writes anything.
--
-- Rows written before this version belong to the source named after the slot that owned the registry
-- (`registry_info.owner_slot`, else the slot of the daemon row), so an upgraded daemon with the default
-- `source.name` carries on where it stopped. Their objects stay at the paths the registry records.
CREATE TABLE {{schema}}.sources (
    name              text        PRIMARY KEY,
    system_identifier text,
    database          text        NOT NULL,
    slot              text        NOT NULL,
    claimed_at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {{schema}}.sources (name, system_identifier, database, slot, claimed_at)
SELECT owner_slot, owner_system_identifier, owner_database, owner_slot, owner_claimed_at
  FROM {{schema}}.registry_info WHERE owner_slot IS NOT NULL AND owner_database IS NOT NULL;

ALTER TABLE {{schema}}.files ADD COLUMN source text;
UPDATE {{schema}}.files SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.files ALTER COLUMN source SET NOT NULL;
DROP INDEX {{schema}}.files_table_idx;
CREATE INDEX files_table_idx ON {{schema}}.files (source, table_schema, table_name, id);

ALTER TABLE {{schema}}.tables ADD COLUMN source text;
UPDATE {{schema}}.tables SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.tables ALTER COLUMN source SET NOT NULL;
ALTER TABLE {{schema}}.tables DROP CONSTRAINT tables_pkey;
ALTER TABLE {{schema}}.tables ADD PRIMARY KEY (source, table_schema, table_name);

ALTER TABLE {{schema}}.reloads ADD COLUMN source text;
UPDATE {{schema}}.reloads SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.reloads ALTER COLUMN source SET NOT NULL;
DROP INDEX {{schema}}.reloads_one_active_idx;
CREATE UNIQUE INDEX reloads_one_active_idx ON {{schema}}.reloads (source, table_schema, table_name)
    WHERE status IN ('requested', 'running');
-- A hand-written marker without `source=` reaches every daemon sharing the registry schema with one
-- request id: each source's reload of it is its own row.
DROP INDEX {{schema}}.reloads_request_idx;
CREATE UNIQUE INDEX reloads_request_idx ON {{schema}}.reloads (source, request);

ALTER TABLE {{schema}}.reload_requests ADD COLUMN source text;
UPDATE {{schema}}.reload_requests SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.reload_requests ALTER COLUMN source SET NOT NULL;
ALTER TABLE {{schema}}.reload_requests DROP CONSTRAINT reload_requests_pkey;
ALTER TABLE {{schema}}.reload_requests ADD PRIMARY KEY (source, request);

ALTER TABLE {{schema}}.ddl_history ADD COLUMN source text;
UPDATE {{schema}}.ddl_history SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.ddl_history ALTER COLUMN source SET NOT NULL;

ALTER TABLE {{schema}}.slot_events ADD COLUMN source text;
UPDATE {{schema}}.slot_events SET source = (SELECT coalesce((SELECT owner_slot FROM {{schema}}.registry_info),
                        (SELECT min(slot_name) FROM {{schema}}.daemon), ''));
ALTER TABLE {{schema}}.slot_events ALTER COLUMN source SET NOT NULL;
DROP INDEX {{schema}}.slot_events_slot_idx;
CREATE INDEX slot_events_source_idx ON {{schema}}.slot_events (source, id);

ALTER TABLE {{schema}}.daemon ADD COLUMN source text;
-- Keyed by source from now on: each slot's row is the row of the source named after it (the owner's
-- row included, which the other tables' rows go to).
UPDATE {{schema}}.daemon SET source = slot_name;
ALTER TABLE {{schema}}.daemon ALTER COLUMN source SET NOT NULL;
ALTER TABLE {{schema}}.daemon DROP CONSTRAINT daemon_pkey;
ALTER TABLE {{schema}}.daemon ADD PRIMARY KEY (source);

-- The single owner of version 4 is now the `sources` row above.
ALTER TABLE {{schema}}.registry_info
    DROP COLUMN owner_system_identifier,
    DROP COLUMN owner_database,
    DROP COLUMN owner_slot,
    DROP COLUMN owner_claimed_at;
