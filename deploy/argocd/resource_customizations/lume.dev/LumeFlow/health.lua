-- Argo CD health of a lume.dev LumeFlow, read from its status: observedGeneration, the
-- Stalled/Ready/Reconciling conditions, the phase and the last flow run.
-- Healthy: Ready, and deployed and waiting (phase Ready) or its run Completed.
-- Progressing: not yet observed, or Reconciling: deploying, a run pending or running (a sync
-- wave waits for it), or Prefect unreachable while the operator retries.
-- Degraded: Stalled (invalid spec), the run Failed, or not Ready and no longer reconciling.
-- Suspended: the current flow run is paused in Prefect, waiting to be resumed.
local hs = {}

local function condition(conditionType)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return c.reason or ""
end

local function runName(run)
  if run == nil then
    return "The flow run"
  end
  return "Flow run " .. tostring(run.name or run.id or "")
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the flow"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = obj.status.phase
local run = obj.status.lastRun

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = runName(run) .. " " .. tostring(run and run.state or "failed")
  if run ~= nil and run.message ~= nil and run.message ~= "" then
    hs.message = hs.message .. ": " .. run.message
  end
  return hs
end

if run ~= nil and run.stateType == "PAUSED" then
  hs.status = "Suspended"
  hs.message = runName(run) .. " is paused"
  return hs
end

local ready = condition("Ready")
local isReady = ready ~= nil and ready.status == "True"
if isReady and phase == "Completed" then
  hs.status = "Healthy"
  hs.message = runName(run) .. " completed"
  return hs
end
if isReady and phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Deployed; waiting for its schedule or a run request"
  return hs
end

-- Reconciling: a run in progress, or waiting (for the backend, or for Prefect while it is
-- unreachable: the operator retries by itself).
local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  if phase == "Running" and run ~= nil then
    hs.message = runName(run) .. " is " .. tostring(run.state or "running")
  else
    hs.message = describe(reconciling)
  end
  return hs
end

if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = "Phase " .. tostring(phase)
return hs
