//! The Zig SDK's helpers for the network tools, against loopback servers and the test
//! MCP server: input
//! {"base": "http://127.0.0.1:PORT"}; the test checks the requests and this output.
const std = @import("std");
const torpor = @import("torpor");

pub fn main() !void {
    const in = try torpor.input(struct { base: []const u8 });
    defer in.deinit();
    const a = torpor.allocator;

    const reply = try torpor.llm.ask("be brief", "hello");
    defer a.free(reply);

    const msgs = [_]torpor.llm.Message{.{ .role = "user", .content = "count" }};
    const chat = try torpor.llm.chat(&msgs, .{ .temperature = 0.5, .max_tokens = 7 });
    defer chat.deinit();

    const url = try std.fmt.allocPrint(a, "{s}/echo", .{in.value.base});
    defer a.free(url);
    const posted = try torpor.http.fetch(.{
        .url = url,
        .method = "POST",
        .headers = .{ .@"X-Trace" = "zig" },
        .body = "ping",
    });
    defer posted.deinit();

    const item_url = try std.fmt.allocPrint(a, "{s}/item", .{in.value.base});
    defer a.free(item_url);
    const item = try torpor.http.getJson(struct { sku: []const u8, qty: i64 }, item_url);
    defer item.deinit();

    const text_url = try std.fmt.allocPrint(a, "{s}/text", .{in.value.base});
    defer a.free(text_url);
    const not_json = if (torpor.http.getJson(std.json.Value, text_url)) |v| blk: {
        v.deinit();
        break :blk "parsed";
    } else |err| @errorName(err);

    const refused = if (torpor.http.fetch(.{ .url = "http://example.invalid/x" })) |v| blk: {
        v.deinit();
        break :blk "fetched";
    } else |err| @errorName(err);
    const rule = if (torpor.lastFailure()) |f| f.rule else null;

    const customer = try torpor.mcp.invoke("crm", "lookup_customer", .{ .customer_id = "C-42" });
    defer customer.deinit();

    try torpor.output(.{
        .reply = reply,
        .chat = chat.value.content,
        .tokens = chat.value.usage.total_tokens,
        .status = posted.value.status,
        .echo = posted.value.json,
        .sku = item.value.sku,
        .qty = item.value.qty,
        .not_json = not_json,
        .refused = refused,
        .rule = rule,
        .customer = customer.value.structured,
    });
}
