// Sign-in through the identity provider the api advertises (GET /auth/config): the authorization
// code flow with PKCE (S256) as a public client, so the page holds no secret. The verifier and a
// random `state` wait in sessionStorage while the browser is at the provider; the way back is
// accepted only with the same state, and the code is exchanged once, then removed from the URL.

const PENDING_KEY = "dataport.oidc.pending";

function base64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(size = 32) {
  return base64url(crypto.getRandomValues(new Uint8Array(size)));
}

/** The page's own address without query or fragment: the redirect URI registered at the provider. */
function redirectUri() {
  const url = new URL(window.location.href);
  url.search = "";
  url.hash = "";
  return url.toString();
}

async function discover(issuer) {
  const url = `${issuer.replace(/\/$/, "")}/.well-known/openid-configuration`;
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch {
    throw new Error("The identity provider cannot be reached.");
  }
  if (!response.ok) throw new Error(`The identity provider's discovery document answered ${response.status}.`);
  return response.json();
}

/** Off to the provider's login page; the browser comes back to this page with a code. */
export async function startSignIn(config) {
  const provider = await discover(config.issuer);
  const verifier = randomString(48);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const state = randomString();
  sessionStorage.setItem(PENDING_KEY, JSON.stringify({ state, verifier, redirectUri: redirectUri() }));
  const url = new URL(provider.authorization_endpoint);
  const params = {
    response_type: "code",
    client_id: config.clientId,
    redirect_uri: redirectUri(),
    scope: config.scopes || "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  };
  if (config.audience) {
    params.resource = config.audience; // RFC 8707 (oidc-provider, Keycloak with it enabled)
    params.audience = config.audience; // Auth0
  }
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  window.location.assign(url.toString());
}

/**
 * Back from the provider: the access token for the code in the URL, or null when the URL has none.
 * Throws an Error with a message for the page when the provider refused, the state does not match
 * or the exchange fails.
 */
export async function finishSignIn(config) {
  const here = new URL(window.location.href);
  const code = here.searchParams.get("code");
  const error = here.searchParams.get("error");
  if (!code && !error) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null");
  sessionStorage.removeItem(PENDING_KEY);
  window.history.replaceState(null, "", redirectUri()); // the code is used once, and not bookmarked
  if (!pending || pending.state !== here.searchParams.get("state")) {
    throw new Error("The sign-in came back with an unexpected state; sign in again.");
  }
  if (error) {
    throw new Error(`The identity provider refused the sign-in: ${here.searchParams.get("error_description") || error}.`);
  }
  const provider = await discover(config.issuer);
  const body = new URLSearchParams({
    grant_type: "authorization_code",
    code,
    redirect_uri: pending.redirectUri,
    client_id: config.clientId,
    code_verifier: pending.verifier,
  });
  if (config.audience) body.set("resource", config.audience);
  let response;
  try {
    response = await fetch(provider.token_endpoint, { method: "POST", body });
  } catch {
    throw new Error("The identity provider cannot be reached.");
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok || !answer.access_token) {
    throw new Error(`The identity provider did not give a token: ${answer.error_description || answer.error || response.status}.`);
  }
  return answer.access_token;
}
