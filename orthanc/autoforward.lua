-- Auto-forward of the test PACS: when a study becomes stable (no new instance for StableAge
-- seconds), send its CT image series to the modality "cad-node", once per study.
--
-- Once per study: after a successful forward the study gets the user-defined metadata
-- CadNodeForwarded (declared in UserMetadata; value: the time and the series sent). The node's
-- SR and SEG arriving later make the study stable again; the marker makes this hook skip it.
-- The marker lives in Orthanc's index with the study, so it survives restarts and disappears
-- with the study (a study deleted and sent again is forwarded again). Series of a study that
-- arrive after its forward are not sent either (once per study).
--
-- The store is synchronous, so that only a forward the node accepted marks the study. A failed
-- forward (node down) is logged and leaves no marker: the next instance that arrives in the
-- study makes it stable again and retries it (orthanc/README.md shows a manual retry).

local MODALITY = 'cad-node'
local MARKER = 'CadNodeForwarded'

local function HasMarker(studyId)
  local names = ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == MARKER then
      return true
    end
  end
  return false
end

-- The AE title the node calls us with is its registered one; series it sent are its own results.
local function NodeAet()
  local modalities = ParseJson(RestApiGet('/modalities?expand'))
  local node = modalities[MODALITY]
  if node == nil then
    return nil
  end
  return node['AET']
end

local function SentByNode(series, nodeAet)
  if nodeAet == nil or series['Instances'][1] == nil then
    return false
  end
  local uri = '/instances/' .. series['Instances'][1] .. '/metadata?expand'
  local remoteAet = ParseJson(RestApiGet(uri))['RemoteAET']
  return remoteAet ~= nil and string.upper(remoteAet) == string.upper(nodeAet)
end

-- The CT image series of the study: Modality CT, not SR/SEG/other, not made by the node.
local function CtSeries(studyId)
  local nodeAet = NodeAet()
  local chosen = {}
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local tags = series['MainDicomTags']
    if tags['Modality'] == 'CT' and not SentByNode(series, nodeAet) then
      table.insert(chosen, series)
    end
  end
  return chosen
end

function OnStableStudy(studyId, tags, metadata)
  local studyUid = tags['StudyInstanceUID'] or '?'
  if HasMarker(studyId) then
    print('autoforward: study ' .. studyId .. ' (' .. studyUid .. ') stable again, already forwarded: skipped')
    return
  end

  local series = CtSeries(studyId)
  if #series == 0 then
    print('autoforward: study ' .. studyId .. ' (' .. studyUid .. ') has no CT series: nothing forwarded')
    return
  end

  local ids = {}
  local described = {}
  for _, s in ipairs(series) do
    table.insert(ids, s['ID'])
    table.insert(described, s['MainDicomTags']['SeriesInstanceUID'] .. ' (' .. #s['Instances'] .. ' instances)')
  end
  local summary = table.concat(described, ', ')

  local request = { Resources = ids, Synchronous = true }
  local answer = RestApiPost('/modalities/' .. MODALITY .. '/store', DumpJson(request, true))
  if answer == nil then
    print('autoforward: FAILED to forward study ' .. studyId .. ' (' .. studyUid .. ') to ' .. MODALITY ..
          ': ' .. summary .. '; not marked, the next instance in the study retries')
    return
  end

  local marker = os.date('!%Y-%m-%dT%H:%M:%SZ') .. ' ' .. summary
  RestApiPut('/studies/' .. studyId .. '/metadata/' .. MARKER, marker)
  print('autoforward: forwarded study ' .. studyId .. ' (' .. studyUid .. ') to ' .. MODALITY .. ': ' .. summary)
end
