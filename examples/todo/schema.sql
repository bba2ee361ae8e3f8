-- Sample todo app: lists are shared with everyone, todos belong to their owner.
CREATE TABLE IF NOT EXISTS lists (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    name text NOT NULL,
    owner_id text NOT NULL
);
CREATE TABLE IF NOT EXISTS todos (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    description text NOT NULL,
    completed boolean NOT NULL DEFAULT false,
    owner_id text NOT NULL,
    list_id uuid NOT NULL REFERENCES lists(id) ON DELETE CASCADE
);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'powersync') THEN
        CREATE PUBLICATION powersync FOR ALL TABLES;
    END IF;
END $$;
