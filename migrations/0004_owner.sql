-- cdc-egress registry, version 4: who the registry belongs to.
--
-- A registry serves exactly one slot of one source database (README "Running several daemons"): two
-- daemons streaming different slots into one registry would complete each other's notices, act on each
-- other's reload markers and remove each other's uploads as orphans. The first daemon to run claims
-- the registry; any other slot or database is refused before it writes anything. To hand the registry
-- to another slot on purpose: UPDATE <schema>.registry_info SET owner_slot = NULL.
ALTER TABLE {{schema}}.registry_info
    ADD COLUMN owner_system_identifier text,
    ADD COLUMN owner_database          text,
    ADD COLUMN owner_slot              text,
    ADD COLUMN owner_claimed_at        timestamptz;
