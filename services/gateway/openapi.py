"""The OpenAPI description served at /openapi.json.

OpenAPI 3.1, so the schemas are JSON Schema 2020-12: it can say that the keys of a routing table are version numbers
or version labels (``propertyNames``), which OpenAPI 3.0 cannot. A routing entry is a version number ("3") or a
version label of the model server's config ("canary"; TF Serving's rule: letters, digits and '_', not all digits).
"""

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERRORS = {str(s): {"description": d, "content": {"application/json": {"schema": _ERROR}}}
           for s, d in ((400, "bad input"), (401, "missing or wrong admin token"), (404, "unknown version, label, "
                        "request or photo"), (408, "the body did not arrive within --body-timeout"),
                        (413, "body or photo over the limit (a compressed body's, once decoded)"),
                        (415, "a Content-Encoding other than gzip, deflate or br (Accept-Encoding lists them), "
                         "or (classify) a photo in an image format not taken (unsupported_format: JPEG, PNG, WEBP, "
                         "GIF, BMP and AVIF are)"),
                        (500, "internal_error: the gateway failed (a bug, logged)"),
                        (502, "the model server failed, or (classify) the version asked for breaks the serving "
                         "contract (version_unusable) or answered the photo with NaN (model_answer_not_finite)"),
                        (503, "model server, Redis or the photo store unavailable, or (classify) the gateway "
                         "overloaded: error.code says which; Retry-After set"))}

_LABEL = {"type": "string", "pattern": "^[A-Za-z0-9_]+$",
          "description": "a version label of the model server's config (version_labels): letters, digits and '_' "
                         "(TF Serving's rule [a-zA-Z0-9_]+), not all digits"}
_ENTRY = {"type": "string", "pattern": "^[A-Za-z0-9_]+$",
          "description": "a routing entry: a version number (all digits, e.g. \"3\") or a version label of the model "
                         "server's config (letters, digits and '_', not all digits, e.g. \"canary\")"}
_VERSION_KEY = {"type": "string", "pattern": "^[0-9]+$", "description": "a version number"}
_NUMBER_OR_NULL = {"type": ["number", "null"]}

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "mushroom-serving gateway", "version": "1"},
    "paths": {
        "/v1/classify": {"post": {
            "summary": "Classify one photo (multipart field 'photo', a raw image body, or JSON {image_b64})",
            "parameters": [
                {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3}},
                {"name": "version", "in": "query", "description": "answer with this version, not the A/B split",
                 "schema": {"type": "integer", "minimum": 0}},
                {"name": "label", "in": "query", "description": "answer with the version this version label of the "
                 "model server points at (also the X-Version-Label header)", "schema": _LABEL},
                {"name": "X-Client-Id", "in": "header", "schema": {"type": "string"}},
                {"name": "x-envoy-expected-rq-timeout-ms", "in": "header", "description": "how long the caller "
                 "waits for the answer, as Envoy (Istio, KServe) tells it: a cache miss that the gateway would not "
                 "answer within it is refused at once with 504 deadline_unreachable; 0 or absent: no deadline",
                 "schema": {"type": "integer", "minimum": 0}},
                {"name": "explain", "in": "query", "description": "also return a Grad-CAM heatmap of why (the "
                 "model's explain signature): the raw map and a PNG overlay of the photo's displayed size; off by "
                 "default", "schema": {"type": "string", "enum": ["1", "true", "0", "false"]}},
                {"name": "explain_class", "in": "query", "description": "explain this class label instead of the "
                 "predicted one (implies explain)", "schema": {"type": "string"}},
            ],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "photo": {"type": "string", "format": "binary"}}}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {
                    "type": "object", "required": ["image_b64"], "additionalProperties": False,
                    "description": "the photo in base64, and optionally the options of the query string (checked "
                                   "the same way; an option given both here and in the query string or a header "
                                   "is refused, so is any other field)",
                    "properties": {
                        "image_b64": {"type": "string", "description": "the photo in standard base64 (RFC 4648 "
                                      "section 4; line breaks allowed), bare or as a data: URL "
                                      "(data:image/jpeg;base64,...)"},
                        "top_k": {"type": "integer", "minimum": 1, "default": 3},
                        "version": {"type": "integer", "minimum": 0},
                        "label": _LABEL, "client_id": {"type": "string"}, "explain": {"type": "boolean"},
                        "explain_class": {"type": "string"}}}}}},
            "responses": {"200": {"description": "the answer", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Answer"}}}}, **_ERRORS,
                "504": {"description": "deadline_unreachable: a cache miss the gateway would not answer within the "
                        "caller's x-envoy-expected-rq-timeout-ms", "content": {"application/json": {
                            "schema": _ERROR}}}}}},
        "/v1/models": {"get": {"summary": "Versions, states and routing", "responses": {"200": {
            "description": "models", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Models"}}}}}}},
        "/v1/feedback": {"post": {"summary": "Ground truth for an answer", "requestBody": {"content": {
            "application/json": {"schema": {"type": "object", "required": ["feedback_token", "true_label"],
                                             "properties": {"feedback_token": {"type": "string"},
                                                            "request_id": {"type": "string"},
                                                            "true_label": {"type": "string", "description":
                                                                           "a class of the version that answered "
                                                                           "(400 unknown_class otherwise)"}}}}}},
            "responses": {"200": {"description": "recorded"}, "409": {"description": "already recorded"},
                          "410": {"description": "feedback_token expired"}, **_ERRORS}}},
        "/v1/demo": {"get": {"summary": "The demo photos of the current model", "responses": {"200": {
            "description": "photos"}}}},
        "/v1/demo/photos/{sha256}": {"get": {"summary": "A demo photo", "parameters": [
            {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the photo"}, **_ERRORS}}},
        "/v1/admin/routing": {
            "get": {"summary": "The A/B table, where each entry points now and the AVAILABLE versions",
                    "security": [{"bearer": []}], "responses": {"200": {"description": "routing", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/RoutingAdmin"}}}},
                        **_ERRORS}},
            "put": {"summary": "Set the A/B table (bearer token). Entries are version numbers or version labels, kept "
                               "as given; an unknown label or a version that is not AVAILABLE is refused (400), so "
                               "are weights that are not JSON numbers in 0..1000000 or all 0; {\"clear\": true} "
                               "empties the table; 503 when the model server cannot be asked about the labels; 409 "
                               "routing_changed when expected_generation is not the stored table's generation, 409 "
                               "lease_lost when X-Rollout-Lease is not the lease the rollout controller holds now",
                    "security": [{"bearer": []}],
                    "parameters": [{"name": "expected_generation", "in": "query", "required": False,
                                    "description": "apply the change only while the stored table is this generation "
                                    "(the generation a GET answered), so that a change made meanwhile is not undone",
                                    "schema": {"type": "integer", "minimum": 0}},
                                   {"name": "X-Rollout-Lease", "in": "header", "required": False,
                                    "description": "the rollout controller's lease token: the change is applied "
                                    "only while that lease is held (fencing); operators send none",
                                    "schema": {"type": "string"}},
                                   {"name": "X-Rollout-Candidate", "in": "header", "required": False,
                                    "description": "with X-Rollout-Lease: the version the table rolls out, kept with "
                                    "it, so that an operator's change replacing it is told an override",
                                    "schema": {"type": "integer", "minimum": 0}}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/RoutingUpdate"},
                        "examples": {"labels": {"value": {"weights": {"stable": 90, "canary": 10},
                                                          "shadow": "canary"}},
                                     "versions": {"value": {"weights": {"1": 90, "2": 10}, "shadow": 3}},
                                     "mixed": {"value": {"weights": {"1": 80, "canary": 20}, "shadow": None}},
                                     "clear": {"value": {"clear": True}}}}}},
                    "responses": {"200": {"description": "applied", "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/RoutingApplied"}}}}, **_ERRORS}}},
        "/v1/admin/audit": {"get": {"summary": "Routing changes (entries as they were set) and rollout commands sent "
                                               "through the gateway, newest first",
                                    "security": [{"bearer": []}], "responses": {"200": {
                                        "description": "entries", "content": {"application/json": {"schema": {
                                            "type": "object", "properties": {"entries": {"type": "array", "items": {
                                                "oneOf": [{"$ref": "#/components/schemas/AuditEntry"},
                                                          {"$ref": "#/components/schemas/RolloutCommandEntry"},
                                                          {"type": "object", "required": ["unreadable"],
                                                           "description": "an entry the gateway did not write "
                                                           "(not a JSON object), as text", "properties": {
                                                               "unreadable": {"type": "string"}}}]}}}}}}},
                                        **_ERRORS}}},
        "/v1/admin/status": {"get": {"summary": "Per-version figures, significance test and the routing table with "
                                                "where each entry points now",
                                     "security": [{"bearer": []}], "responses": {"200": {
                                         "description": "status", "content": {"application/json": {"schema": {
                                             "$ref": "#/components/schemas/Status"}}}}, **_ERRORS}}},
        "/v1/admin/rollout": {"get": {"summary": "The rollout controller's state, step, timers, judged figures and "
                                                 "decision history (forwarded to --rollout-url; 404 "
                                                 "rollout_not_configured without one)",
                                      "security": [{"bearer": []}], "responses": {"200": {
                                          "description": "rollout", "content": {"application/json": {"schema": {
                                              "type": "object"}}}}, **_ERRORS}}},
        "/v1/admin/rollout/{action}": {"post": {"summary": "Queue pause, resume, abort, promote or retry (a "
                                                           "rejected version may be rolled out again) for the "
                                                           "rollout controller's next tick",
                                                "security": [{"bearer": []}], "parameters": [{
                                                    "name": "action", "in": "path", "required": True, "schema": {
                                                        "enum": ["pause", "resume", "abort", "promote", "retry"]}}],
                                                "requestBody": {"required": False, "content": {"application/json": {
                                                    "schema": {"type": "object", "additionalProperties": False,
                                                               "properties": {"version": {
                                                                   "type": "integer", "minimum": 0,
                                                                   "description": "retry only (required there): "
                                                                   "the rejected version"}}}}}},
                                                "responses": {"202": {"description": "queued"}, **_ERRORS}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness: the model server answered its last status check (a "
                                       "GetModelStatus every second, deadline --health-timeout) and a version is "
                                       "AVAILABLE",
                            "responses": {"200": {"description": "ready"},
                                          "503": {"description": "not ready; 'reason' says why"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Entry": _ENTRY,
            "Routing": {
                "type": "object",
                "description": "The A/B table as set: weights per entry (relative; 0 removes an entry) and the "
                               "entry mirrored for comparison. Each client id sticks to its entry, so moving a "
                               "label in the model server's config moves no client between entries.",
                "properties": {
                    "weights": {"type": "object", "propertyNames": {"$ref": "#/components/schemas/Entry"},
                                "additionalProperties": {"type": "number", "minimum": 0}},
                    "shadow": {"description": "a version number, a version label or null",
                               "anyOf": [{"type": "integer", "minimum": 0}, {"$ref": "#/components/schemas/Entry"},
                                         {"type": "null"}]}}},
            "RoutingUpdate": {
                "description": "What PUT /v1/admin/routing takes: a table whose weights are JSON numbers from 0 to "
                               "1000000 (relative; 0 leaves the entry out; at least one above 0; an entry may not be "
                               "given twice, e.g. \"1\" and \"01\"), or exactly {\"clear\": true} to empty the "
                               "table so that every request goes to the latest AVAILABLE version. Versions are "
                               "0..2^63-1 (TF Serving's int64). Other fields are refused.",
                "oneOf": [
                    {"type": "object", "required": ["weights"], "additionalProperties": False, "properties": {
                        "weights": {"type": "object", "minProperties": 1,
                                    "propertyNames": {"$ref": "#/components/schemas/Entry"},
                                    "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1000000}},
                        "shadow": {"$ref": "#/components/schemas/Routing/properties/shadow"}}},
                    {"type": "object", "required": ["clear"], "additionalProperties": False,
                     "properties": {"clear": {"const": True}}}]},
            "RoutingState": {
                "description": "The table as set, where each entry points now, and the split actually applied.",
                "allOf": [{"$ref": "#/components/schemas/Routing"}],
                "required": ["weights", "shadow", "resolved", "effective", "fallback"],
                "properties": {
                    "resolved": {
                        "type": "object", "description": "every entry of weights and the shadow -> the version it "
                        "resolves to now; null for a label the model server does not know (any more)",
                        "propertyNames": {"$ref": "#/components/schemas/Entry"},
                        "additionalProperties": {"type": ["integer", "null"], "minimum": 0}},
                    "effective": {
                        "type": "object", "description": "weights per resolved version over AVAILABLE versions "
                        "only (entries on one version add up; a vanished version's or label's share is spread)",
                        "propertyNames": _VERSION_KEY, "additionalProperties": {"type": "number", "minimum": 0}},
                    "fallback": {
                        "type": ["integer", "null"], "minimum": 0, "description": "while no entry's version is "
                        "AVAILABLE, the version answering in their place: the newest AVAILABLE one not newer than "
                        "the table's newest, else the nearest above; null while an entry is AVAILABLE, or with no "
                        "table (the newest version answers)"}}},
            "RoutingAdmin": {"allOf": [{"$ref": "#/components/schemas/RoutingState"}],
                             "required": ["available", "generation"],
                             "properties": {"available": {"type": "array", "items": {"type": "integer"}},
                                            "generation": {"$ref": "#/components/schemas/Generation"},
                                            "writer": {"description": "who stored the table: the operator, the "
                                                       "rollout lease token it was sent under (\"\" for an "
                                                       "operator's own change) and the version it rolled out; null "
                                                       "when unknown", "anyOf": [{"type": "null"}, {
                                                           "type": "object", "properties": {
                                                               "who": {"type": "string"},
                                                               "lease": {"type": "string"},
                                                               "candidate": {"type": ["integer", "null"]}}}]}}},
            "RoutingApplied": {"allOf": [{"$ref": "#/components/schemas/RoutingState"}],
                               "required": ["audit", "generation"],
                               "properties": {"audit": {"$ref": "#/components/schemas/AuditEntry"},
                                              "generation": {"$ref": "#/components/schemas/Generation"},
                                              "rollout": {"type": "object", "description": "only when this "
                                                          "operator's change replaced a running rollout's table: the "
                                                          "rollout is paused (operator override)", "properties": {
                                                              "controller": {"type": "string"},
                                                              "candidate": {"type": "integer"},
                                                              "paused": {"type": "boolean"},
                                                              "message": {"type": "string"}}}}},
            "Generation": {"type": "integer", "minimum": 0, "description": "the stored table's generation, "
                           "incremented by every change (0: never set); PUT ?expected_generation= takes it"},
            "AuditEntry": {"type": "object", "required": ["who", "when", "old", "new"], "properties": {
                "who": {"type": "string", "description": "the operator whose token made the change"},
                "note": {"type": "string", "description": "X-Operator as sent, if any"},
                "when": {"type": "string", "format": "date-time"},
                "old": {"anyOf": [{"$ref": "#/components/schemas/Routing"}, {
                    "type": "string", "description": "what was stored instead of a table (not JSON), as text"}]},
                "new": {"$ref": "#/components/schemas/Routing"},
                "rollout": {"type": "object", "description": "an operator's change that replaced a running "
                            "rollout's table (an override): the controller holding the lease and the version it "
                            "rolled out", "properties": {"controller": {"type": "string"},
                                                         "candidate": {"type": "integer"}}}}},
            "RolloutCommandEntry": {"type": "object", "required": ["who", "when", "action", "status", "answer"],
                                    "properties": {
                "who": {"type": "string", "description": "the operator whose token sent the command"},
                "note": {"type": "string", "description": "X-Operator as sent, if any"},
                "when": {"type": "string", "format": "date-time"},
                "action": {"type": "string", "examples": ["rollout pause"]},
                "status": {"type": "integer", "description": "the rollout controller's HTTP status (202: queued)"},
                "answer": {"description": "the controller's answer as it gave it"}}},
            "Status": {"type": "object", "required": ["versions", "routing", "instance"], "properties": {
                "versions": {"type": "object", "propertyNames": _VERSION_KEY, "additionalProperties": {
                    "type": "object", "properties": {
                        "identity": {"type": ["string", "null"], "description": "the model these figures and this "
                                     "feedback are of (as in /v1/models; kept once the version left); null when this "
                                     "gateway has not learnt it"},
                        "requests": {"type": "integer"}, "p50_ms": _NUMBER_OR_NULL, "p95_ms": _NUMBER_OR_NULL,
                        "error_rate": {"type": "number"}, "cache_hit_rate": {"type": "number"},
                        "misses": {"type": "integer", "description": "answers the version computed (not cached)"},
                        "miss_p95_ms": _NUMBER_OR_NULL,
                        "shadow_requests": {"type": "integer"}, "shadow_agreement": _NUMBER_OR_NULL,
                        "shadow_p50_ms": _NUMBER_OR_NULL,
                        "feedback": {"type": "object", "properties": {"correct": {"type": "integer"},
                                                                      "total": {"type": "integer"}}},
                        "feedback_accuracy": _NUMBER_OR_NULL}}},
                "significance": {"description": "two-proportion z-test between the two most-rated versions",
                                 "anyOf": [{"type": "null"}, {"type": "object", "properties": {
                                     "versions": {"type": "array", "items": {"type": "integer"}},
                                     "z": {"type": "number"}, "p_value": {"type": "number"},
                                     "significant": {"type": "boolean"}}}]},
                "routing": {"$ref": "#/components/schemas/RoutingState"},
                "instance": {"type": "object", "description": "the gateway process whose counts these are (requests, "
                             "errors, latency and shadow figures are per process; feedback is shared): an id drawn "
                             "at start and the start time, so that a restart, which counts from zero, is told apart",
                             "required": ["id", "started"], "properties": {
                                 "id": {"type": "string"}, "started": {"type": "number",
                                                                       "description": "Unix time"}}}}},
            "Models": {"type": "object", "properties": {"models": {"type": "array", "items": {
                "type": "object", "required": ["name", "versions", "routing"], "properties": {
                    "name": {"type": "string"},
                    "versions": {"type": "array", "items": {"type": "object", "properties": {
                        "version": {"type": "integer"}, "state": {"type": "string"},
                        "weight": {"type": "number", "description": "the table's weight of the entries resolving "
                                   "to this version now"},
                        "identity": {"type": ["string", "null"], "description": "which model the number names: a "
                                     "digest of its answers to fixed probe images, in the keys of its cached answers "
                                     "(a number given again to another model gets another); null until the gateway "
                                     "has learnt it, or while the version is not AVAILABLE"},
                        "labels": {"type": "array", "description": "the model's classes (species), not version "
                                   "labels", "items": {"type": "object", "properties": {
                                       "label": {"type": "string"}, "display_name": {"type": "string"}}}},
                        "unusable": {"type": "string", "description": "only for an AVAILABLE version the gateway "
                                     "cannot use (it breaks the serving contract): why; it is routed around"}}}},
                    "routing": {"$ref": "#/components/schemas/RoutingState"}}}}}},
            "Answer": {"type": "object", "properties": {
                "request_id": {"type": "string"},
                "feedback_token": {"type": "string", "description": "send it to /v1/feedback with the true label"},
                "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
                "predictions": {"type": "array", "items": {"type": "object", "properties": {
                    "label": {"type": "string"}, "display_name": {"type": "string"}, "score": {"type": "number"}}}},
                "not_a_mushroom": {"type": "boolean"}, "mushroom_score": {"type": "number"},
                "cached": {"type": "boolean"}, "latency_ms": {"type": "number"},
                "explanation": {"$ref": "#/components/schemas/Explanation"}}},
            "Explanation": {"type": "object", "description": "only with explain: Grad-CAM on the last "
                            "convolutional block for one class", "properties": {
                "label": {"type": "string"}, "display_name": {"type": "string"}, "class_index": {"type": "integer"},
                "heatmap": {"type": "array", "description": "rows of the raw map (7x7 for MobileNet 224), each value "
                            "in [0, 1]", "items": {"type": "array", "items": {"type": "number"}}},
                "width": {"type": "integer"}, "height": {"type": "integer"},
                "overlay_png": {"type": "string", "format": "byte", "description": "base64 PNG of width x height "
                                "(the photo as displayed, after its EXIF orientation): the coloured map, transparent "
                                "where the heat is low, to lay over the photo"}}},
        },
    },
}
