// Thin fetch wrapper: every API failure becomes an Error whose message a person can read.
export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function readableError(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const err = body && body.error;
  let message = err && err.message ? err.message : `${response.status} ${response.statusText || 'error'}`;
  if (response.status === 503) {
    const retry = response.headers.get('Retry-After');
    message = `Service unavailable: ${message}` + (retry ? ` (try again in ${retry} s)` : '');
  } else if (response.status === 401 || response.status === 403) {
    message = `Not authorised: ${message}`;
  }
  return new ApiError(message, response.status, err && err.code);
}

export async function request(path, { method = 'GET', body, token, headers = {} } = {}) {
  const init = { method, headers: { ...headers } };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body instanceof FormData || body instanceof Blob) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`Cannot reach the gateway (${e.message})`, 0, 'network');
  }
  if (!response.ok) throw await readableError(response);
  const type = response.headers.get('Content-Type') || '';
  return type.includes('json') ? response.json() : response.text();
}

// A stable client id keeps this browser on one side of an A/B split (the gateway's routing is sticky per client).
function clientId() {
  let id = localStorage.getItem('mushroom-client-id');
  if (!id) {
    id = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
    localStorage.setItem('mushroom-client-id', id);
  }
  return id;
}

export function classify(blob, { topK = 3, filename = 'photo' } = {}) {
  const form = new FormData();
  form.append('photo', blob, filename);
  return request(`/v1/classify?top_k=${topK}`, { method: 'POST', body: form, headers: { 'X-Client-Id': clientId() } });
}

// The answer with its Grad-CAM `explanation` (heatmap PNG overlay and raw map): for the predicted class, or for
// the class labelled `explainClass`.
export function explain(blob, { explainClass = null, filename = 'photo' } = {}) {
  const form = new FormData();
  form.append('photo', blob, filename);
  const query = explainClass ? `explain_class=${encodeURIComponent(explainClass)}` : 'explain=1';
  const headers = { 'X-Client-Id': clientId() };
  return request(`/v1/classify?top_k=1&${query}`, { method: 'POST', body: form, headers });
}

// `answer` is a /v1/classify answer: its signed feedback_token is what the gateway checks.
export const sendFeedback = (answer, trueLabel) => request('/v1/feedback', {
  method: 'POST',
  body: { feedback_token: answer.feedback_token, request_id: answer.request_id, true_label: trueLabel },
});
export const getModels = () => request('/v1/models');
export const getDemo = () => request('/v1/demo');
export const demoPhotoUrl = (sha256) => `/v1/demo/photos/${encodeURIComponent(sha256)}`;
export const getRouting = (token) => request('/v1/admin/routing', { token });
export const putRouting = (token, routing) => request('/v1/admin/routing', { method: 'PUT', body: routing, token });
export const getAudit = (token) => request('/v1/admin/audit', { token });
export const getStatus = (token) => request('/v1/admin/status', { token });
// The rollout controller's state and commands, forwarded by the gateway (404 rollout_not_configured without one);
// `version` names the version of a command about one (retry).
export const getRollout = (token) => request('/v1/admin/rollout', { token });
export const rolloutCommand = (token, action, version) => request(`/v1/admin/rollout/${encodeURIComponent(action)}`,
  { method: 'POST', token, ...(version === undefined ? {} : { body: { version } }) });
