// Loaded before the seed's code: every request it makes to the server carries the API token (wanrt --api-token).
const WANRT_API_TOKEN = "paste-the-token-here";
const fetchWithoutToken = window.fetch;
window.fetch = (url, init = {}) =>
  fetchWithoutToken(url, { ...init, headers: { ...init.headers, Authorization: `Bearer ${WANRT_API_TOKEN}` } });
