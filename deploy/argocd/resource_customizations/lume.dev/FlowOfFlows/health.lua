-- Argo CD health of a lume.dev FlowOfFlows, read from its status: observedGeneration, the
-- Stalled/Ready/Reconciling conditions, the phase, the parent run and the steps.
-- Healthy: Ready, and deployed and waiting (phase Ready) or the composition Completed.
-- Progressing: not yet observed, or Reconciling: deploying, running (the message counts the
-- completed steps), or Prefect unreachable while the operator retries.
-- Degraded: Stalled (invalid spec or graph), Failed (naming the failed steps), or not Ready and
-- no longer reconciling.
-- Suspended: the composition's parent flow run is paused in Prefect.
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

local function stepsIn(phase)
  local names = {}
  if obj.status.steps ~= nil then
    for _, step in ipairs(obj.status.steps) do
      if step.phase == phase then
        table.insert(names, step.name)
      end
    end
  end
  return names
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the composition"
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
local run = obj.status.run

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  local failed = stepsIn("Failed")
  if #failed > 0 then
    hs.message = "Failed steps: " .. table.concat(failed, ", ")
  elseif run ~= nil and run.message ~= nil and run.message ~= "" then
    hs.message = run.message
  else
    hs.message = "The composition failed"
  end
  return hs
end

if run ~= nil and run.stateType == "PAUSED" then
  hs.status = "Suspended"
  hs.message = "Flow run " .. tostring(run.name or run.id or "") .. " is paused"
  return hs
end

local ready = condition("Ready")
local isReady = ready ~= nil and ready.status == "True"
if isReady and phase == "Completed" then
  hs.status = "Healthy"
  hs.message = "All " .. tostring(#stepsIn("Completed")) .. " steps completed"
  return hs
end
if isReady and phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Deployed; waiting for its schedule or a run request"
  return hs
end

-- Reconciling: the composition running, or waiting (for its flows, or for Prefect while it is
-- unreachable: the operator retries by itself).
local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  if phase == "Running" then
    local total = 0
    if obj.status.steps ~= nil then
      total = #obj.status.steps
    end
    hs.message = tostring(#stepsIn("Completed")) .. " of " .. tostring(total) .. " steps completed"
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
