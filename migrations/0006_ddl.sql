-- cdc-egress registry, version 6: DDL records (README "Schema changes").
--
-- Every captured schema or publication change of a published table is a `files` row of kind `ddl`
-- (its `ddl.yml`, at the change's position) plus a `ddl_history` row with the change itself. A
-- table that was dropped, renamed away or removed from the publication says so in its mode.
ALTER TABLE {{schema}}.tables DROP CONSTRAINT IF EXISTS tables_mode_check;
ALTER TABLE {{schema}}.tables ADD CONSTRAINT tables_mode_check
    CHECK (mode IN ('streaming', 'reloading', 'dropped', 'renamed', 'unpublished'));

ALTER TABLE {{schema}}.ddl_history
    ADD COLUMN seq     integer,
    ADD COLUMN event   text,
    ADD COLUMN xid     bigint,
    ADD COLUMN file_id bigint,
    ADD COLUMN details jsonb;
CREATE UNIQUE INDEX ddl_history_position_idx
    ON {{schema}}.ddl_history (source, table_schema, table_name, commit_lsn, seq);
