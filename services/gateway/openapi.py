"""The OpenAPI description served at /openapi.json."""

_ERROR = {"$ref": "#/components/schemas/Error"}
_ERRORS = {str(s): {"description": d, "content": {"application/json": {"schema": _ERROR}}}
           for s, d in ((400, "bad input"), (401, "missing or wrong admin token"), (404, "unknown version, label, "
                        "request or photo"), (413, "body or photo over the limit"),
                        (503, "model server unavailable (Retry-After set)"))}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "mushroom-serving gateway", "version": "1"},
    "paths": {
        "/v1/classify": {"post": {
            "summary": "Classify one photo (multipart field 'photo', a raw image body, or JSON {image_b64})",
            "parameters": [
                {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3}},
                {"name": "version", "in": "query", "schema": {"type": "integer"}},
                {"name": "label", "in": "query", "schema": {"type": "string"}},
                {"name": "X-Client-Id", "in": "header", "schema": {"type": "string"}},
            ],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "photo": {"type": "string", "format": "binary"}}}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object", "required": ["image_b64"], "properties": {
                    "image_b64": {"type": "string", "format": "byte"}}}}}},
            "responses": {"200": {"description": "the answer", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Answer"}}}}, **_ERRORS}}},
        "/v1/models": {"get": {"summary": "Versions, states and routing", "responses": {"200": {
            "description": "models"}}}},
        "/v1/feedback": {"post": {"summary": "Ground truth for an answer", "requestBody": {"content": {
            "application/json": {"schema": {"type": "object", "required": ["request_id", "true_label"],
                                             "properties": {"request_id": {"type": "string"},
                                                            "true_label": {"type": "string"}}}}}},
            "responses": {"200": {"description": "recorded"}, **_ERRORS}}},
        "/v1/demo": {"get": {"summary": "The demo photos of the current model", "responses": {"200": {
            "description": "photos"}}}},
        "/v1/demo/photos/{sha256}": {"get": {"summary": "A demo photo", "parameters": [
            {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the photo"}, **_ERRORS}}},
        "/v1/admin/routing": {
            "get": {"summary": "The A/B table", "responses": {"200": {"description": "routing"}}},
            "put": {"summary": "Set the A/B table (bearer token)", "security": [{"bearer": []}], "requestBody": {
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Routing"}}}},
                "responses": {"200": {"description": "applied"}, **_ERRORS}}},
        "/v1/admin/audit": {"get": {"summary": "Routing changes, newest first", "security": [{"bearer": []}],
                                    "responses": {"200": {"description": "entries"}, **_ERRORS}}},
        "/v1/admin/status": {"get": {"summary": "Per-version figures and significance test",
                                     "security": [{"bearer": []}], "responses": {"200": {"description": "status"},
                                                                                   **_ERRORS}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (a model version is AVAILABLE)",
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "metrics"}}}},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Routing": {"type": "object", "properties": {
                "weights": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                "shadow": {"type": "integer", "nullable": True}}},
            "Answer": {"type": "object", "properties": {
                "request_id": {"type": "string"},
                "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
                "predictions": {"type": "array", "items": {"type": "object", "properties": {
                    "label": {"type": "string"}, "display_name": {"type": "string"}, "score": {"type": "number"}}}},
                "not_a_mushroom": {"type": "boolean"}, "mushroom_score": {"type": "number"},
                "cached": {"type": "boolean"}, "latency_ms": {"type": "number"}}},
        },
    },
}
