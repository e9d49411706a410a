// A real OpenID provider for Dataport's token tests (tests/fixtures/oidc.py starts it).
//
//   node provider.mjs PORT AUDIENCE
//
// Clients come from OIDC_CLIENTS (JSON: [{client_id, client_secret, alg, claims}]): each gets
// client-credentials JWT access tokens for AUDIENCE, signed with its alg (RS256 or ES256), carrying
// its claims (roles, email, ...). OIDC_WEB_CLIENT (JSON: {client_id, redirect_uris}), when set, adds
// a public client for the browser's authorization-code + PKCE flow (dev login: any user name).
// Keys are made afresh at each start. Prints "ready" once it listens.
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const [port, audience] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const clients = JSON.parse(process.env.OIDC_CLIENTS || '[]');
const web = process.env.OIDC_WEB_CLIENT ? JSON.parse(process.env.OIDC_WEB_CLIENT) : null;
const byId = Object.fromEntries(clients.map((c) => [c.client_id, c]));

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  jwks: { keys: [{ ...rsa, kid: 'rsa-1', use: 'sig', alg: 'RS256' }, { ...ec, kid: 'ec-1', use: 'sig', alg: 'ES256' }] },
  clients: [
    ...clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    ...(web
      ? [{
          client_id: web.client_id,
          // native: a loopback redirect URI matches whatever port the test's api listens on (RFC 8252).
          application_type: 'native',
          token_endpoint_auth_method: 'none',
          grant_types: ['authorization_code'],
          response_types: ['code'],
          redirect_uris: web.redirect_uris,
        }]
      : []),
  ],
  clientBasedCORS: () => true,
  pkce: { required: () => true },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: Boolean(web) },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: 'api',
        audience,
        accessTokenTTL: 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: byId[client.clientId]?.alg || 'RS256' } },
      }),
    },
  },
  loadExistingGrant: async (ctx) => {
    // The browser client: every sign-in is granted the API's scope at once (no consent page).
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile email');
    grant.addResourceScope(audience, 'api');
    await grant.save();
    return grant;
  },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id, email: `${id}@example.com` }) }),
  extraTokenClaims: (ctx, token) => {
    if (token.kind !== 'AccessToken' && token.kind !== 'ClientCredentials') return undefined;
    const client = byId[token.clientId];
    if (client) return client.claims || {};
    return { email: `${token.accountId}@example.com`, roles: ['analyst'] };
  },
});

provider.listen(Number(port), '127.0.0.1', () => console.log('ready'));
