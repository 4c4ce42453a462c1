'use strict';
// The S3 test server of lazyblock: s3rver behind a front that checks every
// request's SigV4 signature the way S3 does, since s3rver itself checks none
// (its authentication middleware leaves SigV4 "unimplemented").
//
// One process: s3rver listens on an ephemeral port of 127.0.0.1; the front
// listens on --address:--port (0: any free port) and writes the port it got
// to --ready once it accepts connections. For each request the front
//   1. reads the whole body (parts are a few MiB in tests);
//   2. authenticates it (below), answering as S3 does, with S3's XML error
//      body, when it fails;
//   3. answers itself what s3rver lacks (AbortMultipartUpload), or forwards
//      the request, without its credentials, to s3rver and streams the
//      answer back;
//   4. appends "METHOD TARGET STATUS [CODE]" to --log, one line a request.
//
// Authentication, in S3's order: no credentials at all is AccessDenied
// (unless --anonymous-reads lets GET and HEAD through, like a public bucket);
// a malformed Authorization header, a credential scope whose region is not
// --region (400 AuthorizationHeaderMalformed with <Region> and an
// x-amz-bucket-region header) or whose service is not s3, or whose date is
// not x-amz-date's; an unknown access key (403 InvalidAccessKeyId); an
// x-amz-date more than 15 minutes from the front's clock (403
// RequestTimeTooSkewed; --clock-skew-seconds sets that clock off on purpose);
// a session token that is not --session-token (400 InvalidToken; a missing
// one is InvalidAccessKeyId, as for temporary keys used without theirs);
// x-amz-* headers sent but not signed; then the signature itself,
// recomputed with AWS's own signer (@aws-sdk/signature-v4) from the request
// as received: method, path exactly as sent, query, the signed headers (Host
// included), x-amz-content-sha256 (403 SignatureDoesNotMatch, with the
// canonical request in the body); and last the body against
// x-amz-content-sha256 (400 XAmzContentSHA256Mismatch). UNSIGNED-PAYLOAD is
// accepted; streaming (aws-chunked) payloads are refused as not implemented.
//
// For tests of failures: --fail-part N answers part N of every multipart
// upload with 500 InternalError; --stall-part N receives part N and never
// answers it (the client has to give up).
//
// Test-only; never exposed beyond loopback.

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');

const { SignatureV4, getCanonicalHeaders } = require('@aws-sdk/signature-v4');
const S3rver = require('s3rver');

const kMaxSkewMs = 15 * 60 * 1000;
const kEmptySha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

function parseArgs(argv) {
  const options = {
    address: '127.0.0.1',
    port: 0,
    buckets: [],
    region: 'us-east-1',
    accessKeyId: 'S3RVER',
    secretAccessKey: 'S3RVER',
    sessionToken: '',
    clockSkewMs: 0,
    anonymousReads: false,
    failPart: 0,
    stallPart: 0,
  };
  const valued = {
    '--address': v => (options.address = v),
    '--port': v => (options.port = Number(v)),
    '--data': v => (options.data = v),
    '--ready': v => (options.ready = v),
    '--log': v => (options.log = v),
    '--bucket': v => options.buckets.push(v),
    '--region': v => (options.region = v),
    '--access-key-id': v => (options.accessKeyId = v),
    '--secret-access-key': v => (options.secretAccessKey = v),
    '--session-token': v => (options.sessionToken = v),
    '--clock-skew-seconds': v => (options.clockSkewMs = Number(v) * 1000),
    '--fail-part': v => (options.failPart = Number(v)),
    '--stall-part': v => (options.stallPart = Number(v)),
  };
  for (let i = 0; i < argv.length; ++i) {
    if (argv[i] === '--anonymous-reads') {
      options.anonymousReads = true;
    } else if (valued[argv[i]] && i + 1 < argv.length) {
      valued[argv[i]](argv[++i]);
    } else {
      throw new Error(`unknown or incomplete argument '${argv[i]}'`);
    }
  }
  for (const required of ['data', 'ready', 'log']) {
    if (!options[required]) throw new Error(`--${required} is required`);
  }
  return options;
}

// The hash the signer asks for, over Node's own crypto: SHA-256, or
// HMAC-SHA256 when given a secret.
class Sha256 {
  constructor(secret) {
    this.hash = secret ? crypto.createHmac('sha256', bytes(secret)) : crypto.createHash('sha256');
  }
  update(data) {
    this.hash.update(bytes(data));
  }
  async digest() {
    return new Uint8Array(this.hash.digest());
  }
}

function bytes(data) {
  return typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data);
}

function xmlEscape(text) {
  return String(text).replace(/[<>&'"]/g, c => `&#${c.charCodeAt(0)};`);
}

class S3Error {
  constructor(status, code, message, detail = {}, headers = {}) {
    Object.assign(this, { status, code, message, detail, headers });
  }
  body() {
    const fields = { Code: this.code, Message: this.message, ...this.detail };
    const inner = Object.entries(fields)
      .map(([name, value]) => `<${name}>${xmlEscape(value)}</${name}>`)
      .join('');
    return `<?xml version="1.0" encoding="UTF-8"?>\n<Error>${inner}</Error>`;
  }
}

// "20150830T123600Z" -> Date, or null.
function parseAmzDate(text) {
  const match = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(text || '');
  if (!match) return null;
  const [, y, mo, d, h, mi, s] = match.map(Number);
  return new Date(Date.UTC(y, mo - 1, d, h, mi, s));
}

function isoSeconds(date) {
  return date.toISOString().replace(/\.\d+Z$/, 'Z');
}

// Headers as received, names lower-cased, repeats joined by commas (as
// SigV4 joins them).
function receivedHeaders(rawHeaders) {
  const headers = {};
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i].toLowerCase();
    headers[name] = name in headers ? `${headers[name]},${rawHeaders[i + 1]}` : rawHeaders[i + 1];
  }
  return headers;
}

// The query of a raw target, decoded: {name: value or [values]}.
function parseQuery(rawQuery) {
  const query = {};
  if (!rawQuery) return query;
  for (const pair of rawQuery.split('&')) {
    if (pair === '') continue;
    const equals = pair.indexOf('=');
    const decode = text => decodeURIComponent(text.replace(/\+/g, ' '));
    const name = decode(equals < 0 ? pair : pair.slice(0, equals));
    const value = equals < 0 ? '' : decode(pair.slice(equals + 1));
    if (!(name in query)) query[name] = value;
    else query[name] = [].concat(query[name], value);
  }
  return query;
}

// {credential: [key, date, region, service, terminator], signedHeaders, signature}
function parseAuthorization(value) {
  const malformed = detail =>
    new S3Error(400, 'AuthorizationHeaderMalformed', `The authorization header is malformed; ${detail}`);
  const space = value.indexOf(' ');
  const algorithm = space < 0 ? value : value.slice(0, space);
  if (algorithm !== 'AWS4-HMAC-SHA256') {
    throw new S3Error(400, 'InvalidArgument', 'Unsupported Authorization Type', {
      ArgumentName: 'Authorization',
      ArgumentValue: value,
    });
  }
  const components = {};
  for (const component of value.slice(space + 1).split(',')) {
    const equals = component.indexOf('=');
    if (equals < 0) throw malformed(`the component '${component.trim()}' has no '='.`);
    components[component.slice(0, equals).trim()] = component.slice(equals + 1).trim();
  }
  for (const name of ['Credential', 'SignedHeaders', 'Signature']) {
    if (!components[name]) throw malformed(`missing ${name}.`);
  }
  const credential = components.Credential.split('/');
  if (credential.length !== 5 || credential[4] !== 'aws4_request') {
    throw malformed(
      `the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".`,
    );
  }
  return {
    credential,
    signedHeaders: components.SignedHeaders.split(';'),
    signature: components.Signature,
  };
}

class Front {
  constructor(options, upstreamPort) {
    this.options = options;
    this.upstreamPort = upstreamPort;
    this.agent = new http.Agent({ keepAlive: true });
    // Requests of each multipart upload still being handled, so that an
    // abort waits for parts in flight (S3 leaves those to chance).
    this.inFlight = new Map(); // uploadId -> {count, waiters: []}
    this.signer = new SignatureV4({
      credentials: {
        accessKeyId: options.accessKeyId,
        secretAccessKey: options.secretAccessKey,
      },
      region: options.region,
      service: 's3',
      sha256: Sha256,
      // S3 signs the path as sent: encoded once, never normalized.
      uriEscapePath: false,
      applyChecksum: false,
    });
  }

  now() {
    return new Date(Date.now() + this.options.clockSkewMs);
  }

  log(req, status, code) {
    fs.appendFileSync(this.options.log, `${req.method} ${req.url} ${status}${code ? ' ' + code : ''}\n`);
  }

  // (Each answer is logged before it is sent: a client that has its answer
  // finds it in the log.)
  fail(req, res, error) {
    this.log(req, error.status, error.code);
    const body = error.body();
    res.writeHead(error.status, {
      'Content-Type': 'application/xml',
      'Content-Length': Buffer.byteLength(body),
      'x-amz-request-id': crypto.randomBytes(8).toString('hex').toUpperCase(),
      ...error.headers,
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  async handle(req, res) {
    const queryAt = req.url.indexOf('?');
    const rawPath = queryAt < 0 ? req.url : req.url.slice(0, queryAt);
    const query = parseQuery(queryAt < 0 ? '' : req.url.slice(queryAt + 1));
    const uploadId = typeof query.uploadId === 'string' ? query.uploadId : null;
    if (req.method === 'DELETE' && uploadId) {
      const body = await readBody(req);
      if (body === null) return;
      return this.answer(req, res, rawPath, query, body, () =>
        this.abortUpload(req, res, rawPath, uploadId));
    }
    // Counted from its first byte, so that an abort that comes later waits.
    const done = uploadId ? this.enter(uploadId) : () => {};
    try {
      const body = await readBody(req);
      if (body === null) return; // the client went away mid-body
      await this.answer(req, res, rawPath, query, body, () => {
        const part = uploadId && req.method === 'PUT' ? Number(query.partNumber) : 0;
        if (part && part === this.options.failPart) {
          return this.fail(req, res, new S3Error(500, 'InternalError',
            'We encountered an internal error. Please try again.'));
        }
        if (part && part === this.options.stallPart) {
          this.log(req, 'held', '');
          // Never answered: the client has to give up and close.
          return new Promise(resolve => res.on('close', resolve));
        }
        return this.forward(req, res, body);
      });
    } finally {
      done();
    }
  }

  // Authenticates the request, then runs `serve`.
  async answer(req, res, rawPath, query, body, serve) {
    try {
      await this.authenticate(req.method, rawPath, query, receivedHeaders(req.rawHeaders), body);
    } catch (error) {
      if (error instanceof S3Error) return this.fail(req, res, error);
      throw error;
    }
    return serve();
  }

  async authenticate(method, rawPath, query, headers, body) {
    const options = this.options;
    if (!('authorization' in headers)) {
      if ('X-Amz-Algorithm' in query) {
        throw new S3Error(501, 'NotImplemented',
          'This test server verifies signatures in the Authorization header only');
      }
      if (options.anonymousReads && (method === 'GET' || method === 'HEAD')) return;
      throw new S3Error(403, 'AccessDenied', 'Access Denied');
    }
    const auth = parseAuthorization(headers.authorization);
    const [accessKeyId, scopeDate, region, service] = auth.credential;
    if (region !== options.region) {
      throw new S3Error(400, 'AuthorizationHeaderMalformed',
        `The authorization header is malformed; the region '${region}' is wrong; ` +
          `expecting '${options.region}'`,
        { Region: options.region },
        { 'x-amz-bucket-region': options.region });
    }
    if (service !== 's3') {
      throw new S3Error(400, 'AuthorizationHeaderMalformed',
        `The authorization header is malformed; incorrect service '${service}'. ` +
          `This endpoint belongs to 's3'.`);
    }
    if (accessKeyId !== options.accessKeyId) {
      throw new S3Error(403, 'InvalidAccessKeyId',
        'The AWS Access Key Id you provided does not exist in our records.',
        { AWSAccessKeyId: accessKeyId });
    }
    const requestTime = parseAmzDate(headers['x-amz-date']);
    if (!requestTime) {
      throw new S3Error(403, 'AccessDenied',
        'AWS authentication requires a valid Date or x-amz-date header');
    }
    if (scopeDate !== headers['x-amz-date'].slice(0, 8)) {
      throw new S3Error(400, 'AuthorizationHeaderMalformed',
        'The authorization header is malformed; Invalid credential date. ' +
          'Date is not the same as X-Amz-Date.');
    }
    const now = this.now();
    if (Math.abs(now - requestTime) > kMaxSkewMs) {
      throw new S3Error(403, 'RequestTimeTooSkewed',
        'The difference between the request time and the current time is too large.',
        {
          RequestTime: headers['x-amz-date'],
          ServerTime: isoSeconds(now),
          MaxAllowedSkewMilliseconds: kMaxSkewMs,
        });
    }
    const token = headers['x-amz-security-token'];
    if (options.sessionToken && token === undefined) {
      throw new S3Error(403, 'InvalidAccessKeyId',
        'The AWS Access Key Id you provided does not exist in our records.',
        { AWSAccessKeyId: accessKeyId });
    }
    if (token !== undefined && token !== options.sessionToken) {
      throw new S3Error(400, 'InvalidToken', 'The provided token is malformed or otherwise invalid.',
        { Token: token });
    }
    const payload = headers['x-amz-content-sha256'];
    if (payload === undefined) {
      throw new S3Error(400, 'InvalidRequest',
        'Missing required header for this request: x-amz-content-sha256');
    }
    if (payload.startsWith('STREAMING-')) {
      throw new S3Error(501, 'NotImplemented',
        `This test server does not verify streaming payloads (${payload})`);
    }
    if (payload !== 'UNSIGNED-PAYLOAD' && !/^[0-9a-f]{64}$/.test(payload)) {
      throw new S3Error(400, 'InvalidArgument',
        'x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, ' +
          'or a valid sha256 value.',
        { ArgumentName: 'x-amz-content-sha256', ArgumentValue: payload });
    }
    const signed = new Set(auth.signedHeaders);
    const unsigned = Object.keys(headers).filter(
      name => (name === 'host' || name.startsWith('x-amz-')) && !signed.has(name));
    if (unsigned.length > 0) {
      throw new S3Error(403, 'AccessDenied',
        'There were headers present in the request which were not signed',
        { HeadersNotSigned: unsigned.join(', ') });
    }
    const signedHeaders = {};
    for (const name of signed) {
      if (name in headers) signedHeaders[name] = headers[name];
    }
    const request = {
      method,
      protocol: 'http:',
      hostname: headers.host,
      path: rawPath,
      query,
      headers: signedHeaders,
    };
    const signOptions = { signingDate: requestTime, signableHeaders: signed };
    const expected = (await this.signer.sign(request, signOptions)).headers.authorization;
    const expectedSignature = expected.slice(expected.lastIndexOf('Signature=') + 10);
    if (expectedSignature !== auth.signature || !expected.includes(
      `SignedHeaders=${[...signed].sort().join(';')},`)) {
      // The steps, from the signer's own functions, so that a failure can
      // be read: what the server signed, byte for byte.
      const canonicalHeaders = getCanonicalHeaders(request, undefined, signed);
      const canonicalRequest = this.signer.createCanonicalRequest(request, canonicalHeaders, payload);
      const scope = `${scopeDate}/${region}/s3/aws4_request`;
      const stringToSign = await this.signer.createStringToSign(
        headers['x-amz-date'], scope, canonicalRequest);
      throw new S3Error(403, 'SignatureDoesNotMatch',
        'The request signature we calculated does not match the signature you provided. ' +
          'Check your key and signing method.',
        {
          AWSAccessKeyId: accessKeyId,
          StringToSign: stringToSign,
          SignatureProvided: auth.signature,
          CanonicalRequest: canonicalRequest,
        });
    }
    if (payload !== 'UNSIGNED-PAYLOAD') {
      const computed = crypto.createHash('sha256').update(body).digest('hex');
      if (computed !== payload) {
        throw new S3Error(400, 'XAmzContentSHA256Mismatch',
          "The provided 'x-amz-content-sha256' header does not match what was computed.",
          { ClientComputedContentSHA256: payload, S3ComputedContentSHA256: computed });
      }
    }
  }

  enter(uploadId) {
    let entry = this.inFlight.get(uploadId);
    if (!entry) this.inFlight.set(uploadId, (entry = { count: 0, waiters: [] }));
    ++entry.count;
    return () => {
      if (--entry.count > 0) return;
      this.inFlight.delete(uploadId);
      for (const wake of entry.waiters) wake();
    };
  }

  async settled(uploadId) {
    const entry = this.inFlight.get(uploadId);
    if (entry) await new Promise(resolve => entry.waiters.push(resolve));
  }

  // AbortMultipartUpload, which s3rver does not implement: removes the
  // upload's directory in s3rver's store (BUCKET/._S3rver_uploads/ID, with
  // the parts received so far).
  async abortUpload(req, res, rawPath, uploadId) {
    await this.settled(uploadId);
    const bucket = decodeURIComponent(rawPath.split('/')[1] || '');
    const uploads = path.join(this.options.data, bucket, '._S3rver_uploads');
    const dir = path.join(uploads, uploadId);
    if (!/^[0-9a-f]+$/.test(uploadId) || !fs.existsSync(dir)) {
      return this.fail(req, res, new S3Error(404, 'NoSuchUpload',
        'The specified upload does not exist. The upload ID may be invalid, or the upload ' +
          'may have been aborted or completed.',
        { UploadId: uploadId }));
    }
    fs.rmSync(dir, { recursive: true, force: true });
    this.log(req, 204, '');
    res.writeHead(204);
    res.end();
  }

  // Sends the request to s3rver and its answer back. A client that goes
  // away does not cut s3rver short: the request is whole by now, and an
  // abort waiting on it must find s3rver done with it.
  forward(req, res, body) {
    const headers = { ...req.headers };
    delete headers.authorization;
    delete headers['x-amz-security-token'];
    delete headers['transfer-encoding'];
    headers['content-length'] = String(body.length);
    return new Promise(resolve => {
      const upstream = http.request(
        {
          host: '127.0.0.1',
          port: this.upstreamPort,
          method: req.method,
          path: req.url,
          headers,
          agent: this.agent,
        },
        answer => {
          this.log(req, answer.statusCode, '');
          answer.on('end', resolve);
          answer.on('error', resolve);
          if (res.destroyed) {
            answer.resume();
            return;
          }
          res.writeHead(answer.statusCode, answer.headers);
          answer.pipe(res);
          res.on('close', () => {
            if (!res.writableFinished) answer.resume(); // unpiped: drain it
          });
        },
      );
      upstream.on('error', error => {
        if (!res.headersSent && !res.destroyed) {
          this.fail(req, res, new S3Error(500, 'InternalError', `s3rver: ${error.message}`));
        } else {
          res.destroy();
        }
        resolve();
      });
      upstream.end(body);
    });
  }
}

// The whole body, or null if the client goes away first.
function readBody(req) {
  return new Promise(resolve => {
    const chunks = [];
    let ended = false;
    req.on('data', chunk => chunks.push(chunk));
    req.on('end', () => {
      ended = true;
      resolve(Buffer.concat(chunks));
    });
    req.on('close', () => {
      if (!ended) resolve(null);
    });
    req.on('error', () => resolve(null));
  });
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const s3rver = new S3rver({
    address: '127.0.0.1',
    port: 0,
    silent: true,
    directory: options.data,
    configureBuckets: options.buckets.map(name => ({ name })),
  });
  const { port: upstreamPort } = await s3rver.run();
  const front = new Front(options, upstreamPort);
  const server = http.createServer((req, res) => {
    front.handle(req, res).catch(error => {
      process.stderr.write(`${req.method} ${req.url}: ${error.stack}\n`);
      if (!res.headersSent) {
        front.fail(req, res, new S3Error(500, 'InternalError', String(error.message)));
      } else {
        res.destroy();
      }
    });
  });
  server.keepAliveTimeout = 60000;
  server.on('error', error => {
    process.stderr.write(`front: cannot listen on ${options.address}:${options.port}: ${error.code}\n`);
    process.exit(3);
  });
  server.listen(options.port, options.address, () => {
    const ready = `${options.ready}.tmp`;
    fs.writeFileSync(ready, String(server.address().port));
    fs.renameSync(ready, options.ready);
  });
}

main().catch(error => {
  process.stderr.write(`front: ${error.stack}\n`);
  process.exit(2);
});
