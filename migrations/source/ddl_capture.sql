-- DDL capture, installed in the SOURCE database with the reload marker (same transaction, same
-- substitutions). Every schema or publication change that touches a published table becomes a
-- transactional logical message with prefix {{prefix_literal}} and `"kind": "ddl"`, emitted inside
-- the DDL's own transaction: pgoutput delivers it at that transaction's commit position, between the
-- data changes made before and after the DDL (ARCHITECTURE.md, "DDL at its exact position"). A
-- rolled-back DDL emits nothing.
--
-- What each message carries (README "Schema changes"): the event (create, alter, rename, drop,
-- publish, unpublish), the command tag, the table's relation OID and name (and its previous name
-- after a rename), the publications it is in now and was in before, its columns before and after
-- (name, attnum, type, not null, default; generated columns, which pgoutput does not send, left out),
-- and whether existing rows changed without row changes in the WAL (`rewrites_rows`, with the
-- reason): an ADD COLUMN whose default fills the existing rows, a table rewrite (a type change, a
-- volatile default), a partition attached or detached. Not the statement text: a client's query
-- string may hold other statements, secrets among them, and would be copied into the WAL, the
-- files, the registry and NATS.
--
-- "Before" comes from {{capture}}.ddl_shadow, the columns and publications of every published table
-- as of its last captured DDL (or of the last `migrate`/daemon start, which refreshes it). It is
-- UNLOGGED: never decoded, never published, costs no WAL. A server crash empties it; the next DDL of
-- a table without a shadow row then reports no columns before and treats any filled-in column as a
-- rewrite (the safe side).
--
-- Everything lives in {{capture}}, a schema of its own owned by the superuser who installs it (the
-- install refuses one owned by anyone else), with EXECUTE and USAGE revoked from PUBLIC. The
-- functions are SECURITY DEFINER with search_path = pg_catalog, pg_temp (pg_temp named last: otherwise
-- it is searched first, and a temporary view or type of the caller would run as the superuser), so a
-- role allowed to alter a published
-- table gets its change recorded without any right of its own here, and no role but a superuser can
-- change what runs as the superuser. (The registry schema may belong to the daemon's role: nothing
-- here lives in it.)

DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
                WHERE n.nspname = {{capture_literal}} AND NOT r.rolsuper) THEN
        RAISE EXCEPTION 'cdc-egress: schema % is owned by a role that is not a superuser', {{capture_literal}}
            USING HINT = 'Its functions run as a superuser: drop it (DROP SCHEMA ... CASCADE) and run cdc-egress migrate as a superuser.';
    END IF;
END
$do$;
CREATE SCHEMA IF NOT EXISTS {{capture}};
REVOKE ALL ON SCHEMA {{capture}} FROM PUBLIC;

CREATE UNLOGGED TABLE IF NOT EXISTS {{capture}}.ddl_shadow (
    relid        oid     PRIMARY KEY,
    schema_name  text    NOT NULL,
    table_name   text    NOT NULL,
    publications text[]  NOT NULL,
    columns      jsonb   NOT NULL
);
-- A partitioned table's leaf partitions, and a partition's root (PostgreSQL 12+ functions).
ALTER TABLE {{capture}}.ddl_shadow ADD COLUMN IF NOT EXISTS partitions oid[];
ALTER TABLE {{capture}}.ddl_shadow ADD COLUMN IF NOT EXISTS root oid;

-- The leaf partitions of a partitioned table (empty for a plain table), read from pg_inherits:
-- pg_partition_tree would lock every partition, on every DDL.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_partitions(rel oid) RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    WITH RECURSIVE tree(relid) AS (
        SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = rel
        UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.relid)
    SELECT coalesce(array_agg(t.relid ORDER BY t.relid), '{}') FROM tree t
      JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE c.relkind <> 'p'
$fn$;

-- The columns of a table as the messages describe them.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_columns(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', a.attname,
               'attnum', a.attnum,
               'type', format_type(a.atttypid, a.atttypmod),
               'not_null', a.attnotnull,
               'default', pg_get_expr(d.adbin, d.adrelid),
               'filled', a.atthasmissing) ORDER BY a.attnum), '[]'::jsonb)
      FROM pg_attribute a
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
$fn$;

-- The publications a table is in now (through a table list, a schema, or FOR ALL TABLES), as
-- pg_publication_tables says. Only a permanent table can be published, and the publications that can
-- hold it are few: each one's tables are expanded only when it is FOR ALL TABLES or names the table,
-- one of its ancestors or its schema, not for every table of the database.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_publications(rel oid) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    pubs text[] := '{}';
    pub  record;
    rel_schema text;
    rel_name   text;
BEGIN
    SELECT n.nspname, c.relname INTO rel_schema, rel_name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel AND c.relpersistence = 'p' AND c.relkind IN ('r', 'p');
    IF rel_name IS NULL THEN
        RETURN pubs;
    END IF;
    FOR pub IN SELECT p.pubname FROM pg_publication p
                WHERE p.puballtables
                   OR EXISTS (SELECT 1 FROM pg_publication_rel r
                               WHERE r.prpubid = p.oid
                                 AND (r.prrelid = rel OR r.prrelid IN (SELECT pg_partition_ancestors(rel))
                                      OR r.prrelid = ANY ({{capture}}.ddl_partitions(rel))))
                   OR CASE WHEN to_regclass('pg_catalog.pg_publication_namespace') IS NULL THEN false
                           ELSE {{capture}}.ddl_in_published_schema(p.oid, rel) END
    LOOP
        IF EXISTS (SELECT 1 FROM pg_publication_tables t
                    WHERE t.pubname = pub.pubname AND t.schemaname = rel_schema AND t.tablename = rel_name) THEN
            pubs := pubs || pub.pubname::text;
        END IF;
    END LOOP;
    RETURN pubs;
END
$fn$;

-- Whether publication `pub` publishes the schema of `rel` or of one of its ancestors (PostgreSQL
-- 15+; pg_publication_namespace is read through EXECUTE so the function exists on 14).
CREATE OR REPLACE FUNCTION {{capture}}.ddl_in_published_schema(pub oid, rel oid) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    found boolean;
BEGIN
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_publication_namespace pn JOIN pg_class c ON c.relnamespace = pn.pnnspid
                             WHERE pn.pnpubid = $1 AND (c.oid = $2 OR c.oid IN (SELECT pg_partition_ancestors($2))))'
        INTO found USING pub, rel;
    RETURN found;
END
$fn$;

-- Records a published table's name, publications and columns in the shadow.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_remember(rel oid, rel_schema text, rel_name text, pubs text[], cols jsonb)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO {{capture}}.ddl_shadow (relid, schema_name, table_name, publications, columns, partitions, root)
    VALUES (rel, rel_schema, rel_name, pubs, cols, {{capture}}.ddl_partitions(rel),
            nullif(pg_partition_root(rel), rel))
        ON CONFLICT (relid) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
            publications = EXCLUDED.publications, columns = EXCLUDED.columns, partitions = EXCLUDED.partitions,
            root = EXCLUDED.root;
$fn$;

-- Whether publication `pub` lists `rel` (as pg_publication_tables does: a partitioned table
-- itself under publish_via_partition_root, else its leaves).
CREATE OR REPLACE FUNCTION {{capture}}.ddl_lists(pub text, rel oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t
                     JOIN pg_catalog.pg_namespace n ON n.nspname = t.schemaname
                     JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
                    WHERE t.pubname = pub AND c.oid = rel)
$fn$;

-- `rel` (and, for a partitioned table, its leaves) joined publication `pub`: a `publish` record for
-- each relation the publication lists and did not list before (per the shadow).
CREATE OR REPLACE FUNCTION {{capture}}.ddl_publish(rel oid, pub text, tag text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    c    oid;
    c_schema text;
    c_name   text;
    cols jsonb;
BEGIN
    FOR c IN SELECT unnest(ARRAY[rel] || {{capture}}.ddl_partitions(rel)) LOOP
        CONTINUE WHEN NOT {{capture}}.ddl_lists(pub, c);
        CONTINUE WHEN EXISTS (SELECT 1 FROM {{capture}}.ddl_shadow WHERE relid = c AND pub = ANY (publications));
        SELECT n.nspname, k.relname INTO c_schema, c_name
          FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace WHERE k.oid = c;
        cols := {{capture}}.ddl_columns(c);
        PERFORM {{capture}}.ddl_emit('publish', tag, c, c_schema, c_name, ARRAY[pub], NULL, NULL, cols, NULL, NULL,
                                    false, NULL);
        PERFORM {{capture}}.ddl_remember(c, c_schema, c_name, {{capture}}.ddl_publications(c), cols);
    END LOOP;
END
$fn$;

-- Emits one message (its fields: see the header).
CREATE OR REPLACE FUNCTION {{capture}}.ddl_emit(event text, tag text, rel oid, rel_schema text, rel_name text,
                                               pubs_now text[], pubs_before text[], cols_before jsonb,
                                               cols_after jsonb, prev_schema text, prev_name text,
                                               rewrites boolean, reason text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM pg_logical_emit_message(true, {{prefix_literal}}, json_build_object(
        'kind', 'ddl',
        'format', 1,
        'event', event,
        'command_tag', tag,
        'relation_oid', rel::bigint,
        'schema', rel_schema,
        'table', rel_name,
        'previous_schema', prev_schema,
        'previous_table', prev_name,
        'publications', coalesce(pubs_now, '{}'),
        'previous_publications', coalesce(pubs_before, '{}'),
        'columns_before', cols_before,
        'columns', cols_after,
        'rewrites_rows', rewrites,
        'reason', reason)::text);
END
$fn$;

CREATE OR REPLACE FUNCTION {{capture}}.ddl_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- Remembered until the DDL's ddl_command_end (same statement), which clears it.
    PERFORM set_config('cdc_egress.rewritten',
                       coalesce(current_setting('cdc_egress.rewritten', true), '') || ','
                       || pg_event_trigger_table_rewrite_oid()::text || ',', true);
END
$fn$;

-- One table touched by a DDL (or a leaf of a partitioned table that was): its record, if it is
-- published (now or, per the shadow, before). `only_if_changed` (leaves) skips a table whose columns,
-- name and rows did not change.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_table(rel oid, tag text, rewritten text, only_if_changed boolean)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    shadow     record;
    rel_schema text;
    rel_name   text;
    rel_kind   "char";
    leaves     oid[];
    pubs       text[];
    cols       jsonb;
    event      text;
    rewrites   boolean := false;
    reason     text;
BEGIN
    SELECT n.nspname, c.relname, c.relkind INTO rel_schema, rel_name, rel_kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
    SELECT * INTO shadow FROM {{capture}}.ddl_shadow WHERE relid = rel;
    pubs := {{capture}}.ddl_publications(rel);
    IF cardinality(pubs) = 0 AND shadow.relid IS NULL THEN
        RETURN;
    END IF;
    cols := {{capture}}.ddl_columns(rel);
    leaves := CASE WHEN rel_kind = 'p' THEN {{capture}}.ddl_partitions(rel) ELSE ARRAY[rel] END;
    -- CREATE TABLE AS / SELECT INTO: its rows are decoded like any insert; nothing to repair.
    IF EXISTS (SELECT 1 FROM unnest(leaves) l WHERE position(',' || l::text || ',' IN rewritten) > 0) THEN
        rewrites := true;
        reason := 'table rewritten';
    ELSIF EXISTS (SELECT 1 FROM jsonb_array_elements(cols) c
                   WHERE (shadow.relid IS NULL OR NOT EXISTS (
                          SELECT 1 FROM jsonb_array_elements(shadow.columns) b
                           WHERE b->'attnum' = c->'attnum' AND (b->>'filled')::boolean))
                     -- filled in the table itself, or (a partitioned table has no rows) in a leaf
                     AND EXISTS (SELECT 1 FROM pg_attribute a
                                  WHERE a.attrelid = ANY (leaves) AND a.attname = c->>'name'
                                    AND a.atthasmissing AND NOT a.attisdropped)) THEN
        rewrites := true;
        reason := 'a new column''s default fills existing rows';
    ELSIF rel_kind = 'p' AND shadow.relid IS NOT NULL
          AND shadow.partitions IS DISTINCT FROM {{capture}}.ddl_partitions(rel) THEN
        -- Published as its root (publish_via_partition_root): an attached partition's rows join
        -- it, a detached one's leave it, without a row change in the WAL.
        rewrites := true;
        reason := 'a partition was attached or detached';
    END IF;
    IF only_if_changed AND NOT rewrites AND shadow.relid IS NOT NULL AND shadow.columns = cols
       AND (shadow.schema_name, shadow.table_name) = (rel_schema, rel_name)
       AND cardinality(pubs) > 0 THEN
        RETURN;
    END IF;
    event := CASE
        WHEN tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN 'create'
        WHEN cardinality(pubs) = 0 THEN 'unpublish'
        WHEN shadow.relid IS NOT NULL AND (shadow.schema_name, shadow.table_name) <> (rel_schema, rel_name) THEN 'rename'
        ELSE 'alter' END;
    IF event = 'unpublish' AND shadow.relid IS NOT NULL THEN
        -- Moved out of a published schema: it leaves under the name it was published as.
        rel_schema := shadow.schema_name;
        rel_name := shadow.table_name;
    END IF;
    PERFORM {{capture}}.ddl_emit(event, tag, rel, rel_schema, rel_name, pubs, shadow.publications,
                                shadow.columns, cols,
                                CASE WHEN event = 'rename' THEN shadow.schema_name END,
                                CASE WHEN event = 'rename' THEN shadow.table_name END,
                                rewrites, reason);
    IF cardinality(pubs) = 0 THEN
        DELETE FROM {{capture}}.ddl_shadow WHERE relid = rel;
    ELSE
        PERFORM {{capture}}.ddl_remember(rel, rel_schema, rel_name, pubs, cols);
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION {{capture}}.ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    cmd        record;
    rel        oid;
    pub        text;
    seen       oid[] := '{}';
    rewritten  text := coalesce(current_setting('cdc_egress.rewritten', true), '');
    shadow     record;
    rel_schema text;
    rel_name   text;
    rel_kind   "char";
    top        oid;
    leaf       oid;
    leaf_schema text;
    leaf_name  text;
    pubs       text[];
    cols       jsonb;
BEGIN
    PERFORM set_config('cdc_egress.rewritten', '', true);
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands()
               WHERE object_type IN ('table', 'table column', 'publication relation', 'publication namespace')
                 AND NOT in_extension
    LOOP
        IF cmd.object_type = 'publication relation' THEN
            SELECT p.pubname, r.prrelid INTO pub, rel
              FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid WHERE r.oid = cmd.objid;
            CONTINUE WHEN rel IS NULL;
            PERFORM {{capture}}.ddl_publish(rel, pub, cmd.command_tag);
            CONTINUE;
        END IF;
        IF cmd.object_type = 'publication namespace' THEN
            -- Every table of the schema joins the publication (pg_publication_namespace is PG 15+).
            FOR rel, rel_schema, rel_name, pub IN
                EXECUTE 'SELECT c.oid, n.nspname, c.relname, p.pubname FROM pg_publication_namespace pn
                           JOIN pg_publication p ON p.oid = pn.pnpubid
                           JOIN pg_namespace n ON n.oid = pn.pnnspid
                           JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN (''r'', ''p'')
                                          AND c.relpersistence = ''p''
                          WHERE pn.oid = $1' USING cmd.objid
            LOOP
                PERFORM {{capture}}.ddl_publish(rel, pub, cmd.command_tag);
            END LOOP;
            CONTINUE;
        END IF;
        -- A table or one of its columns: once per table and statement.
        rel := cmd.objid;
        CONTINUE WHEN rel = ANY (seen);
        seen := seen || rel;
        SELECT n.nspname, c.relname, c.relkind INTO rel_schema, rel_name, rel_kind
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
        -- Temporary and unlogged tables are never published; one that was (SET UNLOGGED) leaves.
        CONTINUE WHEN rel_kind IS NULL OR rel_kind NOT IN ('r', 'p')
                   OR ((SELECT relpersistence FROM pg_class WHERE oid = rel) <> 'p'
                       AND NOT EXISTS (SELECT 1 FROM {{capture}}.ddl_shadow WHERE relid = rel));
        top := coalesce(pg_partition_root(rel), rel);
        IF top <> rel AND cmd.command_tag = 'CREATE TABLE' THEN
            -- A new partition is empty: the tree's shadow learns of it without a record for the top.
            UPDATE {{capture}}.ddl_shadow SET partitions = {{capture}}.ddl_partitions(top) WHERE relid = top;
        END IF;
        IF rel_kind = 'p' THEN
            -- The whole tree, from its top: an ATTACH or DETACH one level down changes what the top
            -- holds. Without publish_via_partition_root the leaves are published themselves: an
            -- attached leaf joins the publication with its rows, a detached one leaves it.
            FOR leaf IN SELECT unnest({{capture}}.ddl_partitions(top)) LOOP
                CONTINUE WHEN EXISTS (SELECT 1 FROM {{capture}}.ddl_shadow WHERE relid = leaf);
                pubs := {{capture}}.ddl_publications(leaf);
                CONTINUE WHEN cardinality(pubs) = 0;
                SELECT n.nspname, c.relname INTO leaf_schema, leaf_name
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = leaf;
                cols := {{capture}}.ddl_columns(leaf);
                PERFORM {{capture}}.ddl_emit('publish', cmd.command_tag, leaf, leaf_schema, leaf_name, pubs, NULL,
                                            NULL, cols, NULL, NULL, false, NULL);
                PERFORM {{capture}}.ddl_remember(leaf, leaf_schema, leaf_name, pubs, cols);
                seen := seen || leaf;
            END LOOP;
            FOR shadow IN SELECT * FROM {{capture}}.ddl_shadow
                           WHERE root = top AND relid <> ALL ({{capture}}.ddl_partitions(top)) LOOP
                pubs := {{capture}}.ddl_publications(shadow.relid);
                IF cardinality(pubs) = 0 THEN
                    PERFORM {{capture}}.ddl_emit('unpublish', cmd.command_tag, shadow.relid, shadow.schema_name,
                                                shadow.table_name, pubs, shadow.publications, shadow.columns,
                                                {{capture}}.ddl_columns(shadow.relid), NULL, NULL, false, NULL);
                    DELETE FROM {{capture}}.ddl_shadow WHERE relid = shadow.relid;
                ELSE
                    PERFORM {{capture}}.ddl_remember(shadow.relid, shadow.schema_name, shadow.table_name, pubs,
                                                    shadow.columns);
                END IF;
            END LOOP;
        END IF;
        -- The leaves of a partitioned table change with it: each published one gets its own
        -- record when its columns changed or its rows were rewritten or filled in.
        IF rel_kind = 'p' THEN
            FOR leaf IN SELECT unnest({{capture}}.ddl_partitions(top)) LOOP
                CONTINUE WHEN leaf = ANY (seen);
                seen := seen || leaf;
                PERFORM {{capture}}.ddl_table(leaf, cmd.command_tag, rewritten, true);
            END LOOP;
            IF top <> rel AND NOT top = ANY (seen) THEN
                seen := seen || top;
                PERFORM {{capture}}.ddl_table(top, cmd.command_tag, rewritten, true);
            END IF;
        END IF;
        PERFORM {{capture}}.ddl_table(rel, cmd.command_tag, rewritten, false);
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION {{capture}}.ddl_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    obj    record;
    shadow record;
    pubs   text[];
    rel    oid;
    rel_schema text;
    rel_name   text;
    dropped_tables text[] := '{}';
BEGIN
    -- Dropped tables first: their publication entries go with them and need no message of their own.
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'table' LOOP
        dropped_tables := dropped_tables || (obj.schema_name || '.' || obj.object_name);
        SELECT * INTO shadow FROM {{capture}}.ddl_shadow WHERE relid = obj.objid;
        -- The publications it was in: as the shadow last saw them, and explicit entries dropped with
        -- it. (Not every FOR ALL TABLES publication: temporary and unlogged tables are never in one,
        -- and a dropped table's persistence can no longer be read.)
        CONTINUE WHEN obj.schema_name LIKE 'pg\_temp%' OR obj.schema_name LIKE 'pg\_toast%';
        SELECT coalesce(array_agg(DISTINCT p), '{}') INTO pubs FROM (
            SELECT d.address_args[1] AS p FROM pg_event_trigger_dropped_objects() d
             WHERE d.object_type = 'publication relation'
               AND d.address_names = ARRAY[obj.schema_name, obj.object_name]
            UNION ALL SELECT unnest(shadow.publications)) x;
        CONTINUE WHEN cardinality(pubs) = 0;
        PERFORM {{capture}}.ddl_emit('drop', tg_tag, obj.objid, obj.schema_name, obj.object_name, '{}', pubs,
                                    shadow.columns, NULL, NULL, NULL, false, NULL);
        DELETE FROM {{capture}}.ddl_shadow WHERE relid = obj.objid;
    END LOOP;
    -- A dropped partition takes its rows out of a root that is published as itself, without a row
    -- change in the WAL: that root is reloaded (unless it is being dropped too).
    FOR shadow IN SELECT s.* FROM {{capture}}.ddl_shadow s
                   WHERE s.partitions && ARRAY(SELECT d.objid FROM pg_event_trigger_dropped_objects() d
                                                WHERE d.object_type = 'table')
                     AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = s.relid) LOOP
        PERFORM {{capture}}.ddl_emit('alter', tg_tag, shadow.relid, shadow.schema_name, shadow.table_name,
                                    {{capture}}.ddl_publications(shadow.relid), shadow.publications,
                                    shadow.columns, {{capture}}.ddl_columns(shadow.relid), NULL, NULL, true,
                                    'a partition was dropped');
        PERFORM {{capture}}.ddl_remember(shadow.relid, shadow.schema_name, shadow.table_name,
                                        {{capture}}.ddl_publications(shadow.relid), {{capture}}.ddl_columns(shadow.relid));
    END LOOP;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects()
               WHERE object_type IN ('publication relation', 'publication namespace') AND original LOOP
        IF obj.object_type = 'publication relation' THEN
            CONTINUE WHEN (obj.address_names[1] || '.' || obj.address_names[2]) = ANY (dropped_tables);
            rel := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
            CONTINUE WHEN rel IS NULL;
            PERFORM {{capture}}.ddl_unpublish(rel, obj.address_args[1], tg_tag);
        ELSE
            FOR rel IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = obj.address_names[1] AND c.relkind IN ('r', 'p') LOOP
                PERFORM {{capture}}.ddl_unpublish(rel, obj.address_args[1], tg_tag);
            END LOOP;
        END IF;
    END LOOP;
END
$fn$;

-- `rel` (and, for a partitioned table, its leaves) left publication `pub` (they may still be in
-- others): an `unpublish` record for each relation the shadow had in `pub` that it no longer lists.
CREATE OR REPLACE FUNCTION {{capture}}.ddl_unpublish(rel oid, pub text, tag text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    shadow record;
    pubs   text[];
BEGIN
    FOR shadow IN SELECT * FROM {{capture}}.ddl_shadow
                   WHERE relid = ANY (ARRAY[rel] || {{capture}}.ddl_partitions(rel)) AND pub = ANY (publications) LOOP
        CONTINUE WHEN {{capture}}.ddl_lists(pub, shadow.relid);
        pubs := {{capture}}.ddl_publications(shadow.relid);
        PERFORM {{capture}}.ddl_emit('unpublish', tag, shadow.relid, shadow.schema_name, shadow.table_name, pubs,
                                    ARRAY[pub], shadow.columns, {{capture}}.ddl_columns(shadow.relid), NULL, NULL,
                                    false, NULL);
        IF cardinality(pubs) = 0 THEN
            DELETE FROM {{capture}}.ddl_shadow WHERE relid = shadow.relid;
        ELSE
            UPDATE {{capture}}.ddl_shadow SET publications = pubs WHERE relid = shadow.relid;
        END IF;
    END LOOP;
END
$fn$;

-- Refresh the shadow of every published table: "before" for the next DDL is the catalog as of now.
-- One pass over pg_publication_tables (the publications of a table aggregated, not looked up per table).
SELECT {{capture}}.ddl_remember(c.oid, n.nspname, c.relname, t.pubs, {{capture}}.ddl_columns(c.oid))
  FROM (SELECT schemaname, tablename, array_agg(DISTINCT pubname::text ORDER BY pubname::text) AS pubs
          FROM pg_publication_tables GROUP BY schemaname, tablename) t
  JOIN pg_namespace n ON n.nspname = t.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {{capture}} FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA {{capture}} FROM PUBLIC;

-- Re-created on every install, so they always call this version's functions.
DO $do$
BEGIN
    EXECUTE format('DROP EVENT TRIGGER IF EXISTS %I', {{ddl_end_trigger_literal}});
    EXECUTE format('DROP EVENT TRIGGER IF EXISTS %I', {{ddl_drop_trigger_literal}});
    EXECUTE format('DROP EVENT TRIGGER IF EXISTS %I', {{ddl_rewrite_trigger_literal}});
    EXECUTE format('CREATE EVENT TRIGGER %I ON ddl_command_end WHEN TAG IN (''CREATE TABLE'', ''CREATE TABLE AS'', '
                   '''SELECT INTO'', ''ALTER TABLE'', ''ALTER PUBLICATION'') EXECUTE FUNCTION %s.ddl_command_end()',
                   {{ddl_end_trigger_literal}}, {{capture_ident_literal}});
    EXECUTE format('CREATE EVENT TRIGGER %I ON sql_drop EXECUTE FUNCTION %s.ddl_sql_drop()',
                   {{ddl_drop_trigger_literal}}, {{capture_ident_literal}});
    EXECUTE format('CREATE EVENT TRIGGER %I ON table_rewrite EXECUTE FUNCTION %s.ddl_rewrite()',
                   {{ddl_rewrite_trigger_literal}}, {{capture_ident_literal}});
END
$do$;
