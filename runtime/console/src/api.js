// The one place the console talks to Kiln: the same /v1 API as the CLI, with the token the user
// signed in with (kept in sessionStorage: gone when the tab closes).

const KEY = 'kiln.token';

export const session = {
  token: () => sessionStorage.getItem(KEY),
  signIn: (token) => sessionStorage.setItem(KEY, token),
  signOut: () => sessionStorage.removeItem(KEY),
};

/** An answer of Kiln's that is not a success: its status, and the contract's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Turns a failed response into an ApiError (Kiln's error bodies are {"error": {code, message}}). */
export async function failure(response) {
  let code = 'http_' + response.status;
  let message = response.statusText || 'request failed';
  try {
    const body = await response.json();
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch {
    // Not Kiln's JSON (a proxy's page, say): the status says enough.
  }
  if (response.status === 401) {
    // The token is wrong or was revoked: back to the sign-in form.
    window.dispatchEvent(new CustomEvent('kiln:unauthorized', { detail: message }));
  }
  return new ApiError(response.status, code, message);
}

/** A request with the token; the raw Response (for its headers and body) when it succeeded. */
export async function request(path, { method = 'GET', body, headers = {} } = {}) {
  const response = await fetch(path, {
    method,
    body,
    headers: { ...headers, Authorization: `Bearer ${session.token()}` },
  });
  if (!response.ok) throw await failure(response);
  return response;
}

/** A request answered with JSON (or nothing, for 204). */
export async function json(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

/** A JSON body for POST. */
export function post(path, value) {
  return json(path, {
    method: 'POST',
    body: JSON.stringify(value),
    headers: { 'Content-Type': 'application/json' },
  });
}
