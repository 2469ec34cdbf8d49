//! The Torpor guest SDK for Zig: what an agent imports as `@import("torpor")`.
//!
//! It speaks guest ABI v1 (`guest_sdk/ABI.md`) over the `torpor` imports, like the C
//! SDK, with what a Zig programmer expects instead of C's conventions:
//!
//! * JSON through `std.json`: `input(T)` and `call(T, ...)` parse into your own types
//!   and hand back a `std.json.Parsed(T)` (free it with `deinit`); arguments and
//!   outputs are any value `std.json.Stringify` can write (structs, anonymous
//!   structs, `std.json.Value`, slices, optionals).
//! * Errors as error sets: a failed tool call returns one `ToolError` per ABI code
//!   (`error.Denied`, `error.RateLimited`, ...); the host's error object (message,
//!   the policy rule that decided, `retryable`, details) is kept in `lastFailure()`,
//!   the way `std.json.Diagnostics` keeps what a parse error cannot carry.
//! * `std.log` reaches the agent's log (the entry file routes `std.options.logFn`
//!   here), and a panic (a safety check, `unreachable`, `@panic`) fails the agent
//!   with error code `aborted` and the panic's message.
//!
//! `tool_call` is the only place an agent can be hibernated: every `call` may
//! suspend, move to disk or another process, and continue in a fresh instance with
//! all locals intact. Nothing here is special about that; Asyncify does it at build.
//!
//! Memory comes from `allocator` (growing the linear memory up to the policy's
//! budget); a grow the host refuses is `error.OutOfMemory`, and an agent that returns
//! it fails with error code `memory_limit`.

const std = @import("std");

/// Where every allocation of the SDK comes from, and the one agents should use.
pub const allocator: std.mem.Allocator = .{ .ptr = undefined, .vtable = &Heap.vtable };

/// The imports of ABI v1, module `torpor` (section 4). Zig imports only those an
/// agent reaches, so an agent that calls no tool does not import `tool_call` and
/// runs under a policy that grants none.
const abi = struct {
    extern "torpor" fn input_len() i32;
    extern "torpor" fn input_read(ptr: [*]u8, cap: i32) i32;
    extern "torpor" fn output_write(ptr: [*]const u8, len: i32) i32;
    extern "torpor" fn log(level: i32, ptr: [*]const u8, len: i32) i32;
    extern "torpor" fn tool_call(name_ptr: [*]const u8, name_len: i32, args_ptr: [*]const u8, args_len: i32) i32;
    extern "torpor" fn response_len() i32;
    extern "torpor" fn response_read(ptr: [*]u8, cap: i32) i32;
    extern "torpor" fn abort(kind: i32, msg_ptr: [*]const u8, msg_len: i32) noreturn;
};

// -----------------------------------------------------------------------------
// Errors
// -----------------------------------------------------------------------------

/// One error per negative ABI code (section 5), in the table's order.
pub const ToolError = error{
    Fault,
    InvalidJson,
    TooLarge,
    UnknownTool,
    InvalidArgs,
    ToolFailed,
    Denied,
    ResultTooLarge,
    RateLimited,
    Timeout,
    Unavailable,
};

/// What a tool call can fail with: the host's answer, no memory, or a result that
/// does not parse as the type the agent asked for (`error.UnexpectedResult`).
pub const CallError = ToolError || error{ OutOfMemory, UnexpectedResult };

/// `output` and `log` fail only on what the host checks: bounds, size, JSON.
pub const OutputError = error{ Fault, TooLarge, InvalidJson, OutOfMemory };

/// The input does not parse as the type asked for (its reason is logged at debug).
pub const InputError = error{ OutOfMemory, InvalidInput };

/// `fail` returns it after logging the message: `main` returning it makes the run
/// fail with `agent_error` and that message, and nothing more is logged.
pub const AgentFailed = error{AgentFailed};

/// The ABI name of an error ("denied" for `error.Denied`), as the host spells it.
pub fn codeName(err: anyerror) []const u8 {
    return switch (err) {
        error.Fault => "fault",
        error.InvalidJson => "invalid_json",
        error.TooLarge => "too_large",
        error.UnknownTool => "unknown_tool",
        error.InvalidArgs => "invalid_args",
        error.ToolFailed => "tool_failed",
        error.Denied => "denied",
        error.ResultTooLarge => "result_too_large",
        error.RateLimited => "rate_limited",
        error.Timeout => "timeout",
        error.Unavailable => "unavailable",
        error.UnexpectedResult => "unexpected_result",
        else => @errorName(err),
    };
}

fn errorOf(rc: i32) ToolError {
    return switch (rc) {
        -1 => error.Fault,
        -2 => error.InvalidJson,
        -3 => error.TooLarge,
        -4 => error.UnknownTool,
        -5 => error.InvalidArgs,
        -7 => error.Denied,
        -8 => error.ResultTooLarge,
        -9 => error.RateLimited,
        -10 => error.Timeout,
        -11 => error.Unavailable,
        else => error.ToolFailed, // -6, and any code a newer host may add
    };
}

/// The host's error object for the last failed call (ABI section 5).
pub const Failure = struct {
    /// The tool that failed.
    tool: []const u8,
    err: CallError,
    /// `code`, `message`, `rule` and `retryable` as the host sent them; `rule` is set
    /// when a policy rule decided (a denial: `"tools"` for a tool not granted).
    code: []const u8,
    message: []const u8,
    rule: ?[]const u8,
    /// Why the rule refused, when it says (`"not_granted"`, `"namespace_not_granted"`).
    reason_code: ?[]const u8,
    retryable: bool,
    /// The whole error object, for the details a tool attaches (`available`, ...).
    object: std.json.Value,
    /// The response as the host wrote it.
    raw: []const u8,

    /// A detail the tool or rule attached, or null.
    pub fn get(self: *const Failure, key: []const u8) ?std.json.Value {
        return switch (self.object) {
            .object => |o| o.get(key),
            else => null,
        };
    }
};

var last_failure: ?Failure = null;
var failure_arena: std.heap.ArenaAllocator = .init(allocator);

/// The last failed call's error object (valid until the next failure), or null.
pub fn lastFailure() ?*const Failure {
    return if (last_failure) |*f| f else null;
}

fn remember(tool: []const u8, err: CallError, raw: []const u8, message_if_none: []const u8) void {
    _ = failure_arena.reset(.retain_capacity);
    const a = failure_arena.allocator();
    var f: Failure = .{
        .tool = a.dupe(u8, tool) catch "",
        .err = err,
        .code = codeName(err),
        .message = a.dupe(u8, message_if_none) catch "", // it may live on the caller's stack
        .rule = null,
        .reason_code = null,
        .retryable = false,
        .object = .null,
        .raw = a.dupe(u8, raw) catch "",
    };
    if (std.json.parseFromSliceLeaky(std.json.Value, a, f.raw, .{})) |v| {
        f.object = v;
        if (v == .object) {
            if (stringMember(v, "code")) |s| f.code = s;
            if (stringMember(v, "message")) |s| f.message = s;
            f.rule = stringMember(v, "rule");
            f.reason_code = stringMember(v, "reason_code");
            if (v.object.get("retryable")) |r| f.retryable = r == .bool and r.bool;
        }
    } else |_| {}
    last_failure = f;
}

fn stringMember(v: std.json.Value, key: []const u8) ?[]const u8 {
    const m = v.object.get(key) orelse return null;
    return if (m == .string) m.string else null;
}

// -----------------------------------------------------------------------------
// Input and output
// -----------------------------------------------------------------------------

var input_cache: ?[]const u8 = null;

/// The agent's input as the host sent it (JSON text, validated by the host).
pub fn inputText() error{OutOfMemory}![]const u8 {
    if (input_cache) |t| return t;
    const n = abi.input_len();
    const buf = try allocator.alloc(u8, @intCast(@max(n, 0)));
    const got = abi.input_read(ptrOfMut(buf), @intCast(buf.len));
    input_cache = buf[0..@intCast(@max(got, 0))];
    return input_cache.?;
}

/// The input parsed as `T` (members `T` does not name are ignored). A field that is
/// missing or of the wrong type, or a number out of range, is `error.InvalidInput`.
pub fn input(comptime T: type) InputError!std.json.Parsed(T) {
    const text = try inputText();
    return std.json.parseFromSlice(T, allocator, text, .{ .ignore_unknown_fields = true }) catch |e| switch (e) {
        error.OutOfMemory => error.OutOfMemory,
        else => {
            log(.debug, "the input does not parse as {s}: {s}", .{ @typeName(T), @errorName(e) });
            return error.InvalidInput;
        },
    };
}

/// Set the agent's output to `value` written as JSON (the last call wins).
pub fn output(value: anytype) OutputError!void {
    const text = try stringify(value);
    defer allocator.free(text);
    return outputRaw(text);
}

/// Set the agent's output to JSON text (at most 1 MiB; the host checks it is JSON).
pub fn outputRaw(json: []const u8) OutputError!void {
    if (json.len > std.math.maxInt(i32)) return error.TooLarge;
    return switch (abi.output_write(ptrOf(json), @intCast(json.len))) {
        0 => {},
        -1 => error.Fault,
        -3 => error.TooLarge,
        else => error.InvalidJson,
    };
}

/// `value` as compact JSON text (caller frees with `allocator`). An empty struct
/// (`.{}`) is `{}`, the empty object, as tool arguments expect.
pub fn stringify(value: anytype) error{OutOfMemory}![]u8 {
    const T = @TypeOf(value);
    if (@typeInfo(T) == .@"struct" and @typeInfo(T).@"struct".field_names.len == 0) return allocator.dupe(u8, "{}");
    return std.json.Stringify.valueAlloc(allocator, value, .{});
}

/// Tool arguments: as `stringify`, but an optional field that is null is left out
/// (so `.namespace = null` means "no namespace", not `"namespace": null`).
fn stringifyArgs(value: anytype) error{OutOfMemory}![]u8 {
    const T = @TypeOf(value);
    if (@typeInfo(T) == .@"struct" and @typeInfo(T).@"struct".field_names.len == 0) return allocator.dupe(u8, "{}");
    return std.json.Stringify.valueAlloc(allocator, value, .{ .emit_null_optional_fields = false });
}

// -----------------------------------------------------------------------------
// Logging and failing
// -----------------------------------------------------------------------------

pub const Level = enum(i32) { debug = 0, info = 1, warn = 2, err = 3 };

/// The host keeps at most this much of one message.
pub const max_log = 64 * 1024;

/// Append a formatted message to the agent's log (cut at 64 KiB). Never suspends,
/// never fails the agent: a message that cannot be formatted for lack of memory is
/// logged as its format string.
pub fn log(level: Level, comptime fmt: []const u8, args: anytype) void {
    var small: [512]u8 = undefined;
    const text = std.fmt.bufPrint(&small, fmt, args) catch
        std.fmt.allocPrint(allocator, fmt, args) catch fmt;
    defer if (text.ptr != &small and text.ptr != fmt.ptr) allocator.free(text);
    logText(level, text);
}

/// Append `msg` as it is (cut at 64 KiB).
pub fn logText(level: Level, msg: []const u8) void {
    const cut = msg[0..@min(msg.len, max_log)];
    _ = abi.log(@backingInt(level), ptrOf(cut), @intCast(cut.len));
}

/// `std.options.logFn` for agents: `std.log.info(...)` goes to the agent's log,
/// with the scope in front when it is not the default one.
pub fn logFn(
    comptime message_level: std.log.Level,
    comptime scope: @EnumLiteral(),
    comptime format: []const u8,
    args: anytype,
) void {
    const level: Level = switch (message_level) {
        .debug => .debug,
        .info => .info,
        .warn => .warn,
        .err => .err,
    };
    const prefix = if (scope == .default) "" else "(" ++ @tagName(scope) ++ ") ";
    log(level, prefix ++ format, args);
}

/// Log the message at error level and return `error.AgentFailed`, for
/// `return torpor.fail("...", .{...})` from `main`: the run fails with `agent_error`
/// and this message.
pub fn fail(comptime fmt: []const u8, args: anytype) AgentFailed {
    log(.err, fmt, args);
    return error.AgentFailed;
}

/// Fail the agent right here (error code `aborted`) with a formatted message.
pub fn panic(comptime fmt: []const u8, args: anytype) noreturn {
    var buf: [4096]u8 = undefined;
    const text = std.fmt.bufPrint(&buf, fmt, args) catch buf[0..];
    abi.abort(0, text.ptr, @intCast(text.len));
}

/// The panic handler the entry file installs (`std.debug.FullPanic`): every safety
/// check, `unreachable` and `@panic` ends the agent with `aborted` and the message.
pub fn panicHandler(msg: []const u8, first_trace_addr: ?usize) noreturn {
    _ = first_trace_addr;
    abi.abort(0, msg.ptr, @intCast(@min(msg.len, 4096)));
}

/// Fail the agent with `memory_limit`.
pub fn outOfMemory() noreturn {
    const msg = "torpor.allocator: an allocation failed (the memory budget is spent)";
    abi.abort(1, msg, msg.len);
}

// -----------------------------------------------------------------------------
// Tools
// -----------------------------------------------------------------------------

/// Call a tool with `args` (written as a JSON object) and parse its result as `T`
/// (`std.json.Value` for any JSON; members `T` does not name are ignored). This is
/// the only place the agent may be hibernated: it resumes here with the answer.
/// On failure the error names the ABI code and `lastFailure()` holds the details:
///
///     const r = torpor.call(struct { value: i64 }, "kv.incr", .{ .key = "k" }) catch |e| switch (e) {
///         error.Denied => return torpor.fail("no: {s}", .{torpor.lastFailure().?.message}),
///         else => return e,
///     };
///     defer r.deinit();
pub fn call(comptime T: type, tool: []const u8, args: anytype) CallError!std.json.Parsed(T) {
    const args_json = try stringifyArgs(args);
    defer allocator.free(args_json);
    const raw = try callRaw(tool, args_json);
    defer allocator.free(raw);
    return std.json.parseFromSlice(T, allocator, raw, .{
        .ignore_unknown_fields = true,
        .allocate = .alloc_always,
    }) catch |e| switch (e) {
        error.OutOfMemory => error.OutOfMemory,
        else => {
            var buf: [160]u8 = undefined;
            const why = std.fmt.bufPrint(&buf, "{s} answered a result that does not parse as {s} ({s})", .{
                tool, @typeName(T), @errorName(e),
            }) catch "the result does not parse as the type asked for";
            remember(tool, error.UnexpectedResult, "", why);
            return error.UnexpectedResult;
        },
    };
}

/// Call a tool with JSON text as arguments (empty means `{}`) and return the
/// result's JSON text (caller frees with `allocator`).
pub fn callRaw(tool: []const u8, args_json: []const u8) CallError![]u8 {
    if (tool.len > std.math.maxInt(i32) or args_json.len > std.math.maxInt(i32)) return error.TooLarge;
    const rc = abi.tool_call(ptrOf(tool), @intCast(tool.len), ptrOf(args_json), @intCast(args_json.len));
    const n = abi.response_len();
    const raw = try allocator.alloc(u8, @intCast(@max(n, 0)));
    errdefer allocator.free(raw); // on every error return below, and only there
    if (abi.response_read(ptrOfMut(raw), @intCast(raw.len)) != raw.len) return error.Fault;
    if (rc == 0) return raw;
    const err = errorOf(rc);
    remember(tool, err, raw, "");
    return err;
}

/// The builtin key-value store (`kv.*`), in the agent's private namespace or a
/// shared one its grant lists (`inNamespace`).
pub const kv = struct {
    /// `kv.incr`: add `by` and answer the new value.
    pub fn incr(key: []const u8, by: i64) CallError!i64 {
        return incrIn(null, key, by);
    }

    /// `kv.get`: the stored value parsed as `T`, or null when the key is absent.
    /// Free it with `deinit` (when not null).
    pub fn get(comptime T: type, key: []const u8) CallError!?std.json.Parsed(T) {
        return getIn(T, null, key);
    }

    /// `kv.set`: store `value` (any JSON-writable value) under `key`.
    pub fn set(key: []const u8, value: anytype) CallError!void {
        return setIn(null, key, value);
    }

    pub fn incrIn(namespace: ?[]const u8, key: []const u8, by: i64) CallError!i64 {
        const r = try call(struct { value: i64 }, "kv.incr", .{ .key = key, .by = by, .namespace = namespace });
        defer r.deinit();
        return r.value.value;
    }

    pub fn getIn(comptime T: type, namespace: ?[]const u8, key: []const u8) CallError!?std.json.Parsed(T) {
        const r = try call(struct { value: ?T = null }, "kv.get", .{ .key = key, .namespace = namespace });
        if (r.value.value) |v| return .{ .arena = r.arena, .value = v };
        r.deinit();
        return null;
    }

    pub fn setIn(namespace: ?[]const u8, key: []const u8, value: anytype) CallError!void {
        const r = try call(std.json.Value, "kv.set", .{ .key = key, .value = value, .namespace = namespace });
        r.deinit();
    }
};

/// `clock.now`: Unix time in milliseconds, the only clock an agent has (journaled,
/// so a replay sees the same time).
pub const clock = struct {
    pub fn now() CallError!i64 {
        const r = try call(struct { unix_ms: i64 }, "clock.now", .{});
        defer r.deinit();
        return r.value.unix_ms;
    }
};

/// Chat completions through `llm.chat` (or another `llm.*` grant: `chatWith`). The host
/// picks the endpoint, model and credential from the policy; tokens count against the
/// agent's budget.
pub const llm = struct {
    pub const Message = struct { role: []const u8, content: []const u8 };
    pub const Usage = struct { prompt_tokens: i64 = 0, completion_tokens: i64 = 0, total_tokens: i64 = 0 };
    pub const Answer = struct {
        content: []const u8 = "",
        finish_reason: ?[]const u8 = null,
        usage: Usage = .{},
        model: ?[]const u8 = null,
    };
    /// Members added to the call when set (the grant may cap or refuse them).
    pub const Options = struct {
        model: ?[]const u8 = null,
        temperature: ?f64 = null,
        max_tokens: ?i64 = null,
        seed: ?i64 = null,
        stop: ?[]const []const u8 = null,
        response_format: ?std.json.Value = null,
    };

    pub fn chat(messages: []const Message, options: Options) CallError!std.json.Parsed(Answer) {
        return chatWith("llm.chat", messages, options);
    }

    pub fn chatWith(tool: []const u8, messages: []const Message, options: Options) CallError!std.json.Parsed(Answer) {
        return call(Answer, tool, .{
            .messages = messages,
            .model = options.model,
            .temperature = options.temperature,
            .max_tokens = options.max_tokens,
            .seed = options.seed,
            .stop = options.stop,
            .response_format = options.response_format,
        });
    }

    /// One system message (null for none) and one user message; the reply's text
    /// (caller frees with `allocator`).
    pub fn ask(system: ?[]const u8, user: []const u8) CallError![]u8 {
        var both = [_]Message{ .{ .role = "system", .content = system orelse "" }, .{ .role = "user", .content = user } };
        const r = try chat(if (system == null) both[1..] else both[0..], .{});
        defer r.deinit();
        return allocator.dupe(u8, r.value.content);
    }
};

/// One request through `http.fetch` (or another `http.*` grant: `fetchWith`) to a host
/// on the grant's allowlist. An HTTP error status is an answer, not a failure.
pub const http = struct {
    pub const Response = struct {
        status: i64 = 0,
        url: []const u8 = "",
        headers: ?std.json.Value = null,
        /// The parsed body, when it is JSON; otherwise `body` (text) or `body_base64`.
        json: ?std.json.Value = null,
        body: ?[]const u8 = null,
        body_base64: ?[]const u8 = null,
        truncated: bool = false,
    };

    /// `request` is written as the tool's arguments:
    /// `.{ .url = u, .method = "POST", .headers = .{ .@"X-Key" = "v" }, .body = "text" }`
    /// (`.json = value` sends a JSON body; `.max_bytes`, `.truncate` as the tool takes).
    pub fn fetch(request: anytype) CallError!std.json.Parsed(Response) {
        return fetchWith("http.fetch", request);
    }

    pub fn fetchWith(tool: []const u8, request: anytype) CallError!std.json.Parsed(Response) {
        return call(Response, tool, request);
    }

    /// GET `url` and parse its JSON body as `T`. A body that is not JSON, or not a `T`,
    /// is `error.UnexpectedResult` (with the status in `lastFailure().message`).
    pub fn getJson(comptime T: type, url: []const u8) CallError!std.json.Parsed(T) {
        const r = try call(struct { status: i64 = 0, json: ?T = null }, "http.fetch", .{ .url = url });
        if (r.value.json) |v| return .{ .arena = r.arena, .value = v };
        var buf: [96]u8 = undefined;
        const why = std.fmt.bufPrint(&buf, "the response (status {d}) has no JSON body", .{r.value.status}) catch "";
        r.deinit();
        remember("http.fetch", error.UnexpectedResult, "", why);
        return error.UnexpectedResult;
    }
};

/// The tools of MCP servers the policy names (`[mcp.SERVER]`): `mcp.SERVER.TOOL`.
pub const mcp = struct {
    pub const Result = struct {
        structured: ?std.json.Value = null,
        text: []const u8 = "",
        content: ?std.json.Value = null,
    };

    /// Call `tool` of `server` with `args` (the host checks them against the tool's schema).
    pub fn invoke(server: []const u8, tool: []const u8, args: anytype) CallError!std.json.Parsed(Result) {
        var buf: [160]u8 = undefined; // the host takes names of at most 128 bytes
        const name = std.fmt.bufPrint(&buf, "mcp.{s}.{s}", .{ server, tool }) catch return error.TooLarge;
        return call(Result, name, args);
    }
};

/// Sleep `ms` milliseconds (0 to 30 days) through the builtin `timer.sleep` tool, which
/// the policy must grant: a host-settled timer, so the agent hibernates for the wait, and
/// durable: after a crash a resume waits only what is left (the deadline is read from the
/// call's journaled intent). The same tool as the JS SDK's `torpor.sleep`.
pub fn sleep(ms: u64) CallError!void {
    const r = try call(std.json.Value, "timer.sleep", .{ .ms = ms });
    r.deinit();
}

// -----------------------------------------------------------------------------

/// A pointer the host accepts for `s`: an empty slice may carry any address in Zig,
/// and the host checks even zero-length pairs against the memory's size.
var empty: [1]u8 = .{0};

fn ptrOf(s: []const u8) [*]const u8 {
    return if (s.len == 0) &empty else s.ptr;
}

fn ptrOfMut(s: []u8) [*]u8 {
    return if (s.len == 0) &empty else s.ptr;
}

// -----------------------------------------------------------------------------
// The heap
// -----------------------------------------------------------------------------

/// Power-of-two size classes carved from one heap that starts at `__heap_base` and
/// grows the memory a page at a time, with a free list per class. Zig's
/// `std.heap.wasm_allocator` gives each size class a 64 KiB page of its own: a small
/// agent touching five classes held 320 KiB instead of 128 (and paid three
/// `memory.grow`s to spawn, and a larger memory to scan at every suspension).
/// The heap's state is ordinary linear memory, so it hibernates with the agent.
const Heap = struct {
    const min_class = 4; // 16-byte slots: room for a free-list link, the usual alignment
    const classes = @bitSizeOf(usize);
    const page = 64 * 1024;

    var top: usize = 0;
    var free_lists: [classes]usize = @splat(0);

    const vtable: std.mem.Allocator.VTable = .{ .alloc = alloc, .resize = resize, .remap = remap, .free = free };

    /// The class of a request: the smallest power of two that holds it and its alignment.
    fn classOf(len: usize, alignment: std.mem.Alignment) ?usize {
        const want = @max(len, alignment.toByteUnits(), @as(usize, 1) << min_class);
        const slot = std.math.ceilPowerOfTwo(usize, want) catch return null;
        return std.math.log2_int(usize, slot);
    }

    fn alloc(_: *anyopaque, len: usize, alignment: std.mem.Alignment, _: usize) ?[*]u8 {
        const class = classOf(len, alignment) orelse return null;
        const slot = @as(usize, 1) << @intCast(class);
        const head = free_lists[class];
        if (head != 0 and alignment.check(head)) {
            free_lists[class] = @as(*usize, @ptrFromInt(head)).*;
            return @ptrFromInt(head);
        }
        if (top == 0) top = @intFromPtr(@extern([*]u8, .{ .name = "__heap_base" }));
        const start = std.mem.alignForward(usize, top, @max(alignment.toByteUnits(), @as(usize, 1) << min_class));
        const end = std.math.add(usize, start, slot) catch return null;
        const have = @wasmMemorySize(0) * page;
        if (end > have) {
            const pages = std.math.divCeil(usize, end - have, page) catch return null;
            if (@wasmMemoryGrow(0, pages) == -1) return null;
        }
        top = end;
        return @ptrFromInt(start);
    }

    /// In place while the new length is of the same class. A shrink into a smaller class
    /// is refused too (the caller then copies): the slot would be freed into the smaller
    /// class's list, and a loop that shrinks its buffers would leak a slot per turn.
    fn resize(_: *anyopaque, memory: []u8, alignment: std.mem.Alignment, new_len: usize, _: usize) bool {
        const old = classOf(memory.len, alignment) orelse return false;
        const new = classOf(new_len, alignment) orelse return false;
        return new == old;
    }

    fn remap(ctx: *anyopaque, memory: []u8, alignment: std.mem.Alignment, new_len: usize, ra: usize) ?[*]u8 {
        return if (resize(ctx, memory, alignment, new_len, ra)) memory.ptr else null;
    }

    /// Onto the free list of the class its length says (`resize` keeps that the class
    /// the slot was taken from).
    fn free(_: *anyopaque, memory: []u8, alignment: std.mem.Alignment, _: usize) void {
        const class = classOf(memory.len, alignment) orelse return;
        const addr = @intFromPtr(memory.ptr);
        @as(*usize, @ptrFromInt(addr)).* = free_lists[class];
        free_lists[class] = addr;
    }
};
