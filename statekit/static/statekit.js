/*
 * statekit.js: one statekit session per browser tab, and the browser's state kept in
 * step with the server. No build step, no dependency; plain ES5 over fetch, Promise and
 * URL (every current browser).
 *
 *   <script src="/statekit/statekit.js"></script>
 *   <script>
 *     StateKit.start({ keys: ["login"] }).then(function (kit) {
 *       return kit.fetch("/api/cart", { method: "POST", body: "..." });
 *     });
 *   </script>
 *
 * StateKit.start({prefix: "/statekit", keys: [...], headers: fn}) opens this tab's
 * session (POST <prefix>/open) and resolves to a kit; a second call on the page resolves
 * to the same kit (one session per tab). The session id lives in page memory only: a
 * refresh or a duplicated tab opens a new session. The kit
 *
 * - sends the id (header X-Statekit-Session), the stored browser tokens (header
 *   X-Statekit-Browser, a JSON object {storageKey: token}) and the headers the page's
 *   own `headers` function returns (a CSRF token, say) with kit.fetch() and with htmx
 *   requests (htmx:configRequest): to this page's origin only, never to another;
 * - holds back kit.fetch() calls and htmx requests (htmx:confirm) made while the
 *   session is opening, and sends them once it is open;
 * - fills <input type="hidden" name="statekit_session"> in forms when they are
 *   submitted (and when the session opens, for forms submitted from script);
 * - stores the tokens that answers from this origin carry (X-Statekit-Browser-Set; null
 *   removes a key) in localStorage under "statekit:" + key, shared by every tab;
 * - on pagehide, sends its own id to <prefix>/close (navigator.sendBeacon); when the
 *   page comes back from the back/forward cache (pageshow, persisted), opens a new
 *   session;
 * - when an answer from this origin says the session ended (X-Statekit-Session-Ended),
 *   sets kit.ended and dispatches "statekit:ended" on window (detail {reason, kit}),
 *   unless the request named another session than the tab's now (one sent before the
 *   tab reopened its session);
 *   kit.reopen() closes the tab's session if it is live and opens a new one, and every
 *   opened session dispatches "statekit:opened" (detail {sid, kit});
 * - kit.url(path) gives a URL of this origin naming the session in the query
 *   (?statekit_session=<sid>), for a websocket, which cannot send headers;
 * - kit.watch() (or StateKit.start({watch: true})) opens the tab's change stream
 *   (EventSource on <prefix>/watch, ASGI hosts): each change of the session's states
 *   and of the globals the server streams is dispatched as "statekit:change" on window
 *   (detail {scope, state, value, missed, kit}) and written into the page's elements
 *   marked data-statekit-state="<name>" (a text, a number or a boolean, as text); the
 *   stream follows the session when it is reopened, kit.unwatch() closes it, and
 *   kit.stream is its EventSource (or null once it ended or was refused); a stream that
 *   ends because its session ended ("end" with a reason) dispatches "statekit:ended";
 *   one that dropped and reconnected dispatches "statekit:reconnected" (detail {kit}):
 *   changes made while it was down are not replayed, so read afresh what the page shows;
 * - loaded twice on one page, it keeps the first StateKit (one kit, one session).
 *
 * StateKit.create({keys}) is the token half alone (no session), for pages whose
 * server keeps the session itself.
 */
(function (global) {
  "use strict";

  /* Loaded twice on one page (a base template and a widget, say): one kit all the same. */
  if (global.StateKit) return;

  var SEND = "X-Statekit-Browser";
  var RECEIVE = "X-Statekit-Browser-Set";
  var SESSION = "X-Statekit-Session";
  var ENDED = "X-Statekit-Session-Ended";
  var FIELD = "statekit_session";
  var PARAM = "statekit_session";
  var PREFIX = "statekit:";
  var WEBSOCKET = { "http:": "ws:", "https:": "wss:" };
  var HTTP = { "ws:": "http:", "wss:": "https:" };

  /* localStorage, or a page-memory stand-in where it is missing or refused. */
  function defaultStorage() {
    try {
      if (global.localStorage) return global.localStorage;
    } catch (error) {
      /* storage disabled: fall through */
    }
    var memory = {};
    return {
      getItem: function (key) {
        return Object.prototype.hasOwnProperty.call(memory, key) ? memory[key] : null;
      },
      setItem: function (key, value) {
        memory[key] = String(value);
      },
      removeItem: function (key) {
        delete memory[key];
      },
    };
  }

  /* A URL (string, URL or Request) resolved against the page, or null. */
  function resolve(target) {
    var raw = target && typeof target.url === "string" ? target.url : String(target);
    var here = global.location;
    try {
      return here && here.href ? new global.URL(raw, here.href) : new global.URL(raw);
    } catch (error) {
      return null;
    }
  }

  /* Whether a URL (string, URL or Request) is of this page's origin (ws: counts as
   * http:, wss: as https:). Without a page location, only a relative URL is. */
  function sameOrigin(target) {
    var here = global.location;
    if (!here || !here.host) {
      var raw = target && typeof target.url === "string" ? target.url : String(target);
      return !/^([a-z][a-z0-9+.-]*:|\/\/)/i.test(raw);
    }
    var url = resolve(target);
    if (!url) return false;
    var protocol = HTTP[url.protocol] || url.protocol;
    return protocol === here.protocol && url.host === here.host;
  }

  /* The app's own headers: what options.headers() returns, per request. */
  function appHeaders(options) {
    var hook = options && options.headers;
    if (typeof hook !== "function") return {};
    var made = hook() || {};
    var out = {};
    Object.keys(made).forEach(function (name) {
      if (made[name] !== null && made[name] !== undefined) out[name] = String(made[name]);
    });
    return out;
  }

  /* Add headers to a Request: the app's where the caller set none, statekit's always. */
  function addHeaders(request, app, ours) {
    Object.keys(app).forEach(function (name) {
      if (!request.headers.has(name)) request.headers.set(name, app[name]);
    });
    Object.keys(ours).forEach(function (name) {
      request.headers.set(name, ours[name]);
    });
  }

  function create(options) {
    var keys = ((options && options.keys) || []).slice();
    var storage = (options && options.storage) || defaultStorage();

    /* The tokens of the managed keys, as stored: {storageKey: token}. */
    function tokens() {
      var out = {};
      keys.forEach(function (key) {
        var token = null;
        try {
          token = storage.getItem(PREFIX + key);
        } catch (error) {
          /* unreadable storage reads as no token */
        }
        if (token) out[key] = token;
      });
      return out;
    }

    /* Store the tokens of an X-Statekit-Browser-Set header value, if any. */
    function absorbValue(header) {
      if (!header) return;
      var update;
      try {
        update = JSON.parse(header);
      } catch (error) {
        return; /* not ours: leave the stored tokens alone */
      }
      if (!update || typeof update !== "object") return;
      Object.keys(update).forEach(function (key) {
        if (keys.indexOf(key) < 0) return;
        try {
          if (update[key] === null) storage.removeItem(PREFIX + key);
          else storage.setItem(PREFIX + key, String(update[key]));
        } catch (error) {
          /* full or refused storage: the value is lost, the page goes on */
        }
      });
    }

    /* Store the tokens of a fetch Response's X-Statekit-Browser-Set header, when it
     * comes from this page's origin. */
    function absorb(response) {
      if (response.url && !sameOrigin(response.url)) return;
      absorbValue(response.headers.get(RECEIVE));
    }

    /* fetch() that sends the stored tokens to this origin and keeps the returned ones.
     * The caller's init (and Request) are left as they are. */
    function send(input, init) {
      var request;
      try {
        request = new global.Request(input, init);
      } catch (error) {
        return Promise.reject(error);
      }
      if (!sameOrigin(request.url)) return global.fetch(request);
      var ours = {};
      ours[SEND] = JSON.stringify(tokens());
      addHeaders(request, appHeaders(options), ours);
      return global.fetch(request).then(function (response) {
        absorb(response);
        return response;
      });
    }

    return {
      tokens: tokens,
      absorb: absorb,
      absorbValue: absorbValue,
      fetch: send,
      keys: keys.slice(),
    };
  }

  function fire(name, detail) {
    if (typeof global.dispatchEvent !== "function") return;
    var event;
    if (typeof global.CustomEvent === "function") {
      event = new global.CustomEvent(name, { detail: detail });
    } else if (global.document) {
      event = global.document.createEvent("CustomEvent");
      event.initCustomEvent(name, false, false, detail);
    } else {
      return;
    }
    global.dispatchEvent(event);
  }

  var started = null; /* the page's kit: one session per tab */

  function start(options) {
    if (started) return started.sid ? Promise.resolve(started) : started.reopen();
    options = options || {};
    var prefix = options.prefix === undefined ? "/statekit" : String(options.prefix);
    var browser = create(options);
    var opening = null;
    var kit = {
      sid: null,
      ended: null,
      prefix: prefix,
      keys: browser.keys,
      tokens: browser.tokens,
    };
    started = kit;

    /* The headers that carry this tab's session and the browser's tokens. */
    kit.headers = function () {
      var out = {};
      if (kit.sid) out[SESSION] = kit.sid;
      out[SEND] = JSON.stringify(browser.tokens());
      return out;
    };

    /* Read an answer's statekit headers; getHeader(name) -> string or null. sentWith:
     * the session the request named (undefined: not known). An answer saying that
     * another session than the tab's now ended (a request sent before the tab reopened
     * its session) ends nothing: the tab's live session is not marked ended. */
    function answered(getHeader, sentWith) {
      browser.absorbValue(getHeader(RECEIVE));
      var reason = getHeader(ENDED);
      if (!reason || opening) return;
      if (sentWith !== undefined && (sentWith || null) !== kit.sid) return;
      ended(reason);
    }

    function ended(reason) {
      kit.ended = reason;
      fire("statekit:ended", { reason: reason, kit: kit });
    }

    function fillForms(root) {
      var doc = global.document;
      if (!doc || !doc.querySelectorAll) return;
      var inputs = (root || doc).querySelectorAll('input[name="' + FIELD + '"]');
      for (var i = 0; i < inputs.length; i++) inputs[i].value = kit.sid || "";
    }

    /* fetch() with this tab's session, the browser's tokens and the app's headers, to
     * this page's origin; another origin gets none of them. The caller's init (and
     * Request) are left as they are; a call made while the session opens waits for it. */
    kit.fetch = function (input, init) {
      var request;
      try {
        request = new global.Request(input, init);
      } catch (error) {
        return Promise.reject(error);
      }
      if (!sameOrigin(request.url)) return global.fetch(request);
      var ready = opening ? opening : Promise.resolve(kit);
      var sentWith;
      return ready
        .then(function () {
          addHeaders(request, appHeaders(options), kit.headers());
          sentWith = kit.sid;
          return global.fetch(request);
        })
        .then(function (response) {
          if (!response.url || sameOrigin(response.url)) {
            answered(function (name) {
              return response.headers.get(name);
            }, sentWith);
          }
          return response;
        });
    };

    /* A URL of this page's origin that names the tab's session in its query
     * (statekit_session=<sid>), for a websocket (options.websocket: ws: or wss:). */
    kit.url = function (path, urlOptions) {
      var url = resolve(path === undefined ? "" : path);
      if (!url || !sameOrigin(url)) {
        throw new Error("statekit: kit.url() makes URLs of this page's origin only, not " + path);
      }
      if (!kit.sid) throw new Error("statekit: the tab has no open session");
      url.searchParams.set(PARAM, kit.sid);
      if (urlOptions && urlOptions.websocket) url.protocol = WEBSOCKET[url.protocol] || url.protocol;
      return url.href;
    };

    /* Open a new session for this tab (after "statekit:ended", say); a live one is
     * closed first. */
    kit.reopen = function () {
      if (opening) return opening;
      if (!kit.ended) close();
      kit.sid = null;
      opening = global
        .fetch(prefix + "/open", {
          method: "POST",
          credentials: "same-origin",
          cache: "no-store",
        })
        .then(function (response) {
          if (!response.ok) {
            var error = new Error(
              "statekit: the server did not open a session (HTTP " + response.status + ")"
            );
            error.status = response.status;
            error.retryAfter = response.headers.get("Retry-After");
            throw error;
          }
          return response.json();
        })
        .then(
          function (body) {
            opening = null;
            kit.sid = body.sid;
            kit.ended = null;
            fillForms();
            fire("statekit:opened", { sid: kit.sid, kit: kit });
            return kit;
          },
          function (error) {
            opening = null;
            throw error;
          }
        );
      return opening;
    };

    /* The tab's change stream (Server-Sent Events of <prefix>/watch). */
    var stream = null;
    var watching = false;

    function show(change) {
      var doc = global.document;
      if (!doc || !doc.querySelectorAll) return;
      var value = change.value;
      var kind = typeof value;
      if (kind !== "string" && kind !== "number" && kind !== "boolean") return;
      var marked = doc.querySelectorAll("[data-statekit-state]");
      for (var i = 0; i < marked.length; i++) {
        if (marked[i].getAttribute("data-statekit-state") === change.state) {
          marked[i].textContent = String(value);
        }
      }
    }

    function listen() {
      if (stream) stream.close();
      stream = kit.stream = null;
      if (!watching || !kit.sid || typeof global.EventSource !== "function") return;
      var watched = kit.sid;
      var source = (stream = kit.stream = new global.EventSource(kit.url(prefix + "/watch")));
      source.addEventListener("change", function (event) {
        var change;
        try {
          change = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        change.kit = kit;
        show(change);
        fire("statekit:change", change);
      });
      /* The stream ended for good: its session ended (the reason comes with it, unless
       * the tab opened another since), or the server refused it (no session of its: a
       * refused EventSource closes by itself). */
      source.addEventListener("end", function (event) {
        source.close();
        if (stream === source) stream = kit.stream = null;
        var reason = null;
        try {
          reason = JSON.parse(event.data).reason || null;
        } catch (error) {
          reason = null;
        }
        if (reason && watched === kit.sid && !opening) ended(reason);
      });
      /* A stream that dropped (a server restarting, a proxy's timeout) reconnects by
       * itself; the changes made meanwhile are not replayed, so the page is told it
       * may have missed some ("statekit:reconnected"): read afresh what it shows. */
      var opened = false;
      var dropped = false;
      source.addEventListener("open", function () {
        var back = opened && dropped && stream === source;
        opened = true;
        dropped = false;
        if (back) fire("statekit:reconnected", { kit: kit });
      });
      source.addEventListener("error", function () {
        if (source.readyState === 2) {
          if (stream === source) stream = kit.stream = null;
        } else if (opened) {
          dropped = true; /* (a first connection that failed is no drop) */
        }
      });
    }

    kit.watch = function () {
      watching = true;
      listen();
      return kit;
    };

    kit.unwatch = function () {
      watching = false;
      listen();
      return kit;
    };

    if (options.watch) watching = true;
    if (typeof global.addEventListener === "function") {
      global.addEventListener("statekit:opened", function (event) {
        if (event.detail && event.detail.kit === kit) listen();
      });
    }

    function close() {
      var sid = kit.sid;
      if (!sid) return;
      if (stream) {
        stream.close();
        stream = kit.stream = null;
      }
      kit.sid = null;
      var url = prefix + "/close";
      var nav = global.navigator;
      if (nav && typeof nav.sendBeacon === "function" && nav.sendBeacon(url, sid)) return;
      try {
        global.fetch(url, { method: "POST", body: sid, keepalive: true, credentials: "same-origin" });
      } catch (error) {
        /* the page is going away: nothing more to do */
      }
    }

    if (typeof global.addEventListener === "function") {
      global.addEventListener("pagehide", close);
      global.addEventListener("pageshow", function (event) {
        if (event.persisted && !kit.sid) {
          kit.reopen().then(null, function () {
            kit.ended = "unopened";
            fire("statekit:ended", { reason: "unopened", kit: kit });
          });
        }
      });
    }

    var doc = global.document;
    if (doc && typeof doc.addEventListener === "function") {
      doc.addEventListener(
        "submit",
        function (event) {
          if (event.target && event.target.querySelectorAll) fillForms(event.target);
        },
        true
      );
      /* An htmx request to this origin made while the session opens (hx-trigger="load",
       * say) waits for it, then goes. */
      doc.addEventListener("htmx:confirm", function (event) {
        var detail = event.detail;
        if (!opening || !detail || typeof detail.issueRequest !== "function") return;
        if (detail.path && !sameOrigin(detail.path)) return;
        event.preventDefault();
        opening.then(
          function () {
            detail.issueRequest(false);
          },
          function () {
            /* no session: start() or reopen() rejected, and the page says so */
          }
        );
      });
      doc.addEventListener("htmx:configRequest", function (event) {
        var detail = event.detail;
        if (!detail || !detail.headers) return;
        if (detail.path && !sameOrigin(detail.path)) return;
        var app = appHeaders(options);
        Object.keys(app).forEach(function (name) {
          if (!(name in detail.headers)) detail.headers[name] = app[name];
        });
        var ours = kit.headers();
        Object.keys(ours).forEach(function (name) {
          detail.headers[name] = ours[name];
        });
      });
      doc.addEventListener("htmx:afterRequest", function (event) {
        var detail = event.detail || {};
        var xhr = detail.xhr;
        if (!xhr || !xhr.getResponseHeader) return;
        var where = xhr.responseURL || (detail.pathInfo && detail.pathInfo.requestPath);
        if (where && !sameOrigin(where)) return;
        var config = detail.requestConfig;
        var sent = config && config.headers ? config.headers[SESSION] : undefined;
        answered(function (name) {
          return xhr.getResponseHeader(name);
        }, sent);
      });
    }

    return kit.reopen();
  }

  global.StateKit = {
    start: start,
    create: create,
    SEND: SEND,
    RECEIVE: RECEIVE,
    SESSION: SESSION,
    ENDED: ENDED,
    FIELD: FIELD,
    PARAM: PARAM,
    PREFIX: PREFIX,
  };
})(typeof window !== "undefined" ? window : this);
