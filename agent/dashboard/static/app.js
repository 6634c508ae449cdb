/* HUST-19 dashboard: live worklist (server-sent events), undo expiry. No framework, no build. */
(function () {
  "use strict";

  function expireUndo(root) {
    (root || document).querySelectorAll("form.undo[data-undo-until]").forEach(function (form) {
      var until = Date.parse(form.getAttribute("data-undo-until")) +
                  1000 * Number(form.getAttribute("data-undo-window"));
      var left = until - Date.now();
      if (left <= 0) { form.remove(); return; }
      setTimeout(function () { form.remove(); }, left);
    });
  }

  function liveWorklist() {
    var section = document.getElementById("worklist");
    var status = document.getElementById("live");
    if (!section || !status || !window.EventSource) { return; }
    var busy = false, again = false, lastTotal = section.getAttribute("data-total");

    function say(state, text) {
      status.setAttribute("data-state", state);
      status.textContent = text;
    }

    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      var focusedId = document.activeElement && document.activeElement.id;
      fetch("/worklist" + window.location.search, {credentials: "same-origin",
                                                    headers: {"Accept": "text/html"}})
        .then(function (resp) {
          if (resp.status === 401) { throw new Error("logged out"); }
          if (!resp.ok) { throw new Error("HTTP " + resp.status); }
          return resp.text();
        })
        .then(function (html) {
          var holder = document.createElement("div");
          holder.innerHTML = html;
          var fresh = holder.querySelector("#worklist");
          if (!fresh) { return; }
          section.replaceWith(fresh);
          section = fresh;
          expireUndo(section);
          if (focusedId) {
            var target = document.getElementById(focusedId);
            if (target) { target.focus(); }
          }
          var total = fresh.getAttribute("data-total");
          if (total !== lastTotal) {
            say("live", "Live: worklist updated, " + total + " results.");
            lastTotal = total;
          }
        })
        .catch(function (err) {
          say("down", "Live updates stopped (" + err.message + "): reload the page.");
        })
        .finally(function () {
          busy = false;
          if (again) { again = false; refresh(); }
        });
    }

    /* since: the version this page shows, so a change made while it loaded is not missed */
    var source = new EventSource("/events?since=" +
                                 encodeURIComponent(section.getAttribute("data-version")));
    source.addEventListener("hello", function () { say("live", "Live: new results appear as they arrive."); });
    source.addEventListener("change", refresh);
    source.addEventListener("logout", function () {
      source.close();
      say("down", "Your session ended: reload the page to log in again.");
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        say("down", "Live updates stopped: reload the page.");
      } else {
        say("connecting", "Reconnecting for live updates…");
      }
    };
    /* a reconnect may have missed changes: refetch once it is back */
    var opened = false;
    source.addEventListener("open", function () {
      if (opened) { refresh(); }
      opened = true;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    expireUndo(document);
    liveWorklist();
  });
})();
