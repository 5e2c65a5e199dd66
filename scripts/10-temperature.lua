-- 10-temperature.lua: subscribe every application key to IPSO temperature readings.
--
-- Every *.lua file in this directory is a rule file, loaded into its own sandboxed Lua
-- state, and asked in file-name order (10-... before 20-...). See docs/lua.md.
--
-- connectord calls presubscribe(endpoint, resource, key) when it decides whether a key
-- subscribes to (observes) a resource of a registered endpoint:
--   endpoint = { name = "dev-1", type = "sensor" or nil, domain = "...", queue = false }
--   resource = { path = "/3303/0/5700", rt = nil, ct = nil, ["if"] = nil, obs = true }
--   key      = { id = "..." }
-- (attributes the device did not send are nil).
--
-- Return:
--   true   subscribe
--   false  do not subscribe
--   nil    no opinion: the next rule file is asked, and if none has an opinion the key's
--          JSON pre-subscription rules decide
--
-- This example only says "yes" to the Sensor Value (5700) of any instance of the IPSO
-- Temperature object (3303), on any endpoint, for any key; it has no opinion on anything
-- else. Delete the file (or return nil) to turn it off.

function presubscribe(endpoint, resource, key)
  if resource.path:match("^/3303/%d+/5700$") then
    return true
  end
  return nil
end
