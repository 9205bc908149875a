-- Reload markers, installed in the SOURCE database by `cdc-egress migrate` (needs a superuser:
-- event triggers do). Re-applied on every migrate; idempotent.
--
-- A reload is requested with a comment on the registry schema, never on a user's table:
--     COMMENT ON SCHEMA {{schema}} IS 'cdc-egress reload public.orders';
-- (optionally followed by ` request=<id>` and ` source=<source.name>`). The event trigger below
-- validates the table and turns the request into a transactional logical message with prefix
-- {{prefix_literal}}, which pgoutput delivers in the replication stream at the commit position of the
-- transaction that made the comment. Every daemon whose registry schema is {{schema}} decodes the
-- message; a marker that names a source is acted on by that source's daemon only (README "Running
-- several daemons"), one that names none by each of them. Several daemons with different publications
-- may share this trigger, so it checks only that the table is published at all; `cdc-egress reload`
-- checks the publication of the source it names.
-- {{schema}}, {{schema_literal}}, {{prefix_literal}} and {{trigger}} are substituted by migrate.

CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE OR REPLACE FUNCTION {{schema}}.reload_marker() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    cmd   record;
    note  text;
    parts text[];
    rel   oid;
    rel_schema text;
    rel_name   text;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands()
               WHERE object_type = 'schema' AND objid = to_regnamespace({{schema_literal}})::oid
    LOOP
        note := obj_description(cmd.objid, 'pg_namespace');
        parts := regexp_match(coalesce(note, ''), '^cdc-egress reload (\S+)(?: request=(\S+))?(?: source=([a-z0-9_-]+))?\s*$');
        CONTINUE WHEN parts IS NULL;
        BEGIN
            rel := to_regclass(parts[1]);
        EXCEPTION WHEN OTHERS THEN
            rel := NULL;
        END;
        IF rel IS NULL THEN
            RAISE EXCEPTION 'cdc-egress: cannot reload %: no such table', parts[1]
                USING HINT = 'Name the table as schema.table, e.g. public.orders.';
        END IF;
        SELECT n.nspname, c.relname INTO rel_schema, rel_name
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
        IF NOT EXISTS (SELECT 1 FROM pg_publication_tables
                        WHERE schemaname = rel_schema AND tablename = rel_name) THEN
            RAISE EXCEPTION 'cdc-egress: cannot reload %.%: it is not in any publication', rel_schema, rel_name
                USING HINT = 'Add it with ALTER PUBLICATION ... ADD TABLE, or request a published table.';
        END IF;
        PERFORM pg_logical_emit_message(true, {{prefix_literal}}, json_build_object(
            'kind', 'reload_start',
            'schema', rel_schema,
            'table', rel_name,
            'request', coalesce(parts[2], md5(random()::text || clock_timestamp()::text)),
            'source', parts[3])::text);
    END LOOP;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = {{trigger_literal}}) THEN
        EXECUTE format('CREATE EVENT TRIGGER %I ON ddl_command_end WHEN TAG IN (''COMMENT'') EXECUTE FUNCTION %s.reload_marker()',
                       {{trigger_literal}}, {{schema_ident_literal}});
    END IF;
END
$do$;
