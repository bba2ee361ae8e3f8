-- A few rows so a fresh client has something to sync.
INSERT INTO lists (id, name, owner_id) VALUES
    ('00000000-0000-4000-8000-000000000001', 'Groceries', 'demo-user'),
    ('00000000-0000-4000-8000-000000000002', 'Chores', 'other-user')
ON CONFLICT DO NOTHING;
INSERT INTO todos (description, owner_id, list_id)
SELECT 'todo ' || g, CASE WHEN g % 2 = 0 THEN 'demo-user' ELSE 'other-user' END,
       '00000000-0000-4000-8000-000000000001'
FROM generate_series(1, 20) g
WHERE NOT EXISTS (SELECT 1 FROM todos);
