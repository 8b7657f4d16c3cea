/*
 * statekit.js: one statekit session per browser tab, and the browser's state kept in
 * step with the server. No build step, no dependency; plain ES5 over fetch and
 * Promise (every current browser).
 *
 *   <script src="/statekit/statekit.js"></script>
 *   <script>
 *     StateKit.start({ keys: ["login"] }).then(function (kit) {
 *       return kit.fetch("/api/cart", { method: "POST", body: "..." });
 *     });
 *   </script>
 *
 * StateKit.start({prefix: "/statekit", keys: [...]}) opens this tab's session
 * (POST <prefix>/open) and resolves to a kit. The session id lives in page memory
 * only: a refresh or a duplicated tab opens a new session. The kit
 *
 * - sends the id (header X-Statekit-Session) and the stored browser tokens (header
 *   X-Statekit-Browser, a JSON object {storageKey: token}) with kit.fetch(), and with
 *   htmx requests to this origin (htmx:configRequest);
 * - fills <input type="hidden" name="statekit_session"> in forms when they are
 *   submitted (and when the session opens, for forms submitted from script);
 * - stores the tokens answers carry (X-Statekit-Browser-Set; null removes a key) in
 *   localStorage under "statekit:" + key, shared by every tab of the browser;
 * - on pagehide, sends its own id to <prefix>/close (navigator.sendBeacon); when the
 *   page comes back from the back/forward cache (pageshow, persisted), opens a new
 *   session;
 * - when an answer says the session ended (X-Statekit-Session-Ended), sets kit.ended
 *   and dispatches "statekit:ended" on window (detail {reason, kit}); kit.reopen()
 *   opens a new session, and every opened session dispatches "statekit:opened"
 *   (detail {sid, kit}).
 *
 * StateKit.create({keys}) is the token half alone (no session), for pages whose
 * server keeps the session itself.
 */
(function (global) {
  "use strict";

  var SEND = "X-Statekit-Browser";
  var RECEIVE = "X-Statekit-Browser-Set";
  var SESSION = "X-Statekit-Session";
  var ENDED = "X-Statekit-Session-Ended";
  var FIELD = "statekit_session";
  var PREFIX = "statekit:";

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

    /* Store the tokens of a fetch Response's X-Statekit-Browser-Set header. */
    function absorb(response) {
      absorbValue(response.headers.get(RECEIVE));
    }

    /* fetch() that sends the stored tokens and keeps the returned ones. */
    function send(url, init) {
      init = init || {};
      var headers = new Headers(init.headers || {});
      headers.set(SEND, JSON.stringify(tokens()));
      init.headers = headers;
      init.credentials = init.credentials || "same-origin";
      return global.fetch(url, init).then(function (response) {
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
    var event;
    if (typeof global.CustomEvent === "function") {
      event = new global.CustomEvent(name, { detail: detail });
    } else {
      event = global.document.createEvent("CustomEvent");
      event.initCustomEvent(name, false, false, detail);
    }
    global.dispatchEvent(event);
  }

  /* Whether a URL (as htmx gives it) is of this page's origin. */
  function sameOrigin(url) {
    var link = global.document.createElement("a");
    link.href = url;
    var here = global.location;
    return link.protocol === here.protocol && link.host === here.host;
  }

  function start(options) {
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

    /* The headers that carry this tab's session and the browser's tokens. */
    kit.headers = function () {
      var out = {};
      if (kit.sid) out[SESSION] = kit.sid;
      out[SEND] = JSON.stringify(browser.tokens());
      return out;
    };

    /* Read an answer's statekit headers; getHeader(name) -> string or null. */
    function answered(getHeader) {
      browser.absorbValue(getHeader(RECEIVE));
      var reason = getHeader(ENDED);
      if (reason) {
        kit.ended = reason;
        fire("statekit:ended", { reason: reason, kit: kit });
      }
    }

    function fillForms(root) {
      var inputs = (root || global.document).querySelectorAll('input[name="' + FIELD + '"]');
      for (var i = 0; i < inputs.length; i++) inputs[i].value = kit.sid || "";
    }

    /* fetch() with this tab's session and the browser's tokens. */
    kit.fetch = function (url, init) {
      init = init || {};
      var headers = new Headers(init.headers || {});
      var ours = kit.headers();
      Object.keys(ours).forEach(function (name) {
        headers.set(name, ours[name]);
      });
      init.headers = headers;
      init.credentials = init.credentials || "same-origin";
      return global.fetch(url, init).then(function (response) {
        answered(function (name) {
          return response.headers.get(name);
        });
        return response;
      });
    };

    /* Open a new session for this tab (after "statekit:ended", say). */
    kit.reopen = function () {
      if (opening) return opening;
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

    function close() {
      var sid = kit.sid;
      if (!sid) return;
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

    global.addEventListener("pagehide", close);
    global.addEventListener("pageshow", function (event) {
      if (event.persisted && !kit.sid) {
        kit.reopen().then(null, function () {
          kit.ended = "unopened";
          fire("statekit:ended", { reason: "unopened", kit: kit });
        });
      }
    });

    var doc = global.document;
    if (doc) {
      doc.addEventListener(
        "submit",
        function (event) {
          if (event.target && event.target.querySelectorAll) fillForms(event.target);
        },
        true
      );
      doc.addEventListener("htmx:configRequest", function (event) {
        var detail = event.detail;
        if (!detail || !detail.headers || !kit.sid) return;
        if (detail.path && !sameOrigin(detail.path)) return;
        var ours = kit.headers();
        Object.keys(ours).forEach(function (name) {
          detail.headers[name] = ours[name];
        });
      });
      doc.addEventListener("htmx:afterRequest", function (event) {
        var xhr = event.detail && event.detail.xhr;
        if (!xhr || !xhr.getResponseHeader) return;
        answered(function (name) {
          return xhr.getResponseHeader(name);
        });
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
    PREFIX: PREFIX,
  };
})(typeof window !== "undefined" ? window : this);
